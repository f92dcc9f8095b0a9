#!/usr/bin/env bash
# Re-captures the Slurm output the parser tests read, from the project's local cluster (scripts/local-slurm up).
# Runs a handful of tiny jobs (completed, failed with exit 3, cancelled, requeued, pending, two-node) and saves what
# squeue, scontrol, sbatch and sacct print about them. Takes about a minute.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
eval "$("$here/../../scripts/local-slurm" env)"
work=$(mktemp -d)
cd "$work"
fields=$(python3 -c 'import hpcds.slurm as s; print(s.SQUEUE_FORMAT)')

requeued=$(sbatch --parsable --requeue -N2 --wrap 'sleep 60')
for _ in $(seq 60); do
	[[ $(squeue --noheader -j "$requeued" -o %T) == RUNNING ]] && break
	sleep 0.5
done
scontrol requeue "$requeued"
sbatch --parsable --wrap 'true' >"$here/sbatch_parsable.txt"
ok=$(cat "$here/sbatch_parsable.txt")
sbatch --parsable -J exit-three --wrap 'exit 3' >/dev/null
cancelled=$(sbatch --parsable --time=5 --wrap 'sleep 60')
running=$(sbatch --parsable --time=1-00:00:00 -J 'quickstart-20261123-113512-a name with spaces' --wrap 'sleep 60')
pending=$(sbatch --parsable -N2 -c2 --time=00:02:00 --wrap 'sleep 1')
sleep 3
scancel "$cancelled"
sleep 1
squeue --noheader --states=all -O "$fields" >"$here/squeue_all.txt"
scontrol show hostnames 'n[1-2]' >"$here/scontrol_show_hostnames.txt"
scontrol show config >"$here/scontrol_show_config.txt"
sacct -j "$ok" >"$here/sacct_disabled.txt" 2>&1 || true
# A job array of 5 tasks, at most 2 at once: two tasks running, the other three pending together in one row.
array=$(sbatch --parsable --array=0-4%2 -J sweep-capture -o /dev/null --wrap 'sleep 20')
for _ in $(seq 60); do
	[[ $(squeue --noheader -r -j "$array" -t R | wc -l) == 2 ]] && break
	sleep 0.5
done
squeue --noheader --states=all -j "$array" -O "$fields" >"$here/squeue_array.txt"
scancel "$requeued" "$running" "$pending" "$array"
rm -rf "$work"
echo "captured jobs $ok..$pending into $here"
