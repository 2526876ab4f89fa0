#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the Slurm test tier (needs root).
#
#   bash scripts/slurm_cluster.sh start DIR   # installs slurmctld/slurmd/slurm-client/munge if missing,
#                                             # starts munged, slurmctld and two slurmd ("node1", "node2")
#   bash scripts/slurm_cluster.sh stop DIR    # stops exactly the daemons it started (by their pid files)
#
# After start, DIR/env holds SLURM_CONF and DIST_LORA_SLURM_CLUSTER to source. Two partitions share the
# nodes: "low" (default; preemptible with PreemptMode=REQUEUE and a grace time) and "high" (preempts it).
set -euo pipefail
ACTION=${1:?usage: slurm_cluster.sh start|stop DIR}
DIR=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR}" && cd "$2" && pwd)

stop() {
  for pidfile in "$DIR"/slurmd-node1.pid "$DIR"/slurmd-node2.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

if [ "$ACTION" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)
grep -q " node1 node2" /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge" /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chmod 0600 /etc/munge/munge.key
chmod 0711 /run/munge

cat > "$DIR/slurm.conf" <<EOF
ClusterName=distlora
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again once the previous run's credential has expired: 120 s by default,
# 10 s here so that the tests do not wait.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=20
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=2 State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=2 State=UNKNOWN
PartitionName=low Nodes=node1,node2 Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=20 State=UP
PartitionName=high Nodes=node1,node2 PriorityTier=10 PreemptMode=OFF State=UP
EOF

export SLURM_CONF=$DIR/slurm.conf
stop  # leftovers of an earlier start in the same folder
munged --force --pid-file="$DIR/munged.pid" --socket=/run/munge/munge.socket.2 --log-file="$DIR/munged.log" \
  --seed-file="$DIR/munge/seed"
slurmctld -f "$SLURM_CONF" -i
for node in node1 node2; do slurmd -f "$SLURM_CONF" -N "$node"; done

for _ in $(seq 60); do
  idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -c idle || true)
  [ "$idle" -ge 2 ] && break
  sleep 1
done
if [ "${idle:-0}" -lt 2 ]; then
  echo "slurm_cluster: the nodes did not come up; logs in $DIR" >&2
  sinfo -N >&2 || true
  exit 1
fi
printf 'export SLURM_CONF=%q\nexport DIST_LORA_SLURM_CLUSTER=%q\n' "$SLURM_CONF" "$DIR" > "$DIR/env"
echo "slurm_cluster: 2 nodes up ($DIR)"
