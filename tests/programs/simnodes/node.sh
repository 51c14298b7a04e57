#!/bin/bash
# The setup of one simulated node (tests/simnodes.py), run by unshare as PID 1 of new PID, UTS
# and mount namespaces whose /proc unshare has mounted already; it ends by exec'ing the daemon,
# which stays PID 1.  usage: node.sh HOSTNAME HOSTS_FILE KEPT DAEMON_COMMAND...
# KEPT: the directories under /tmp every node must still see, colon-separated, the shared
# directory first (the repository and the interpreter too, when they lie under /tmp).
# Its mounts stay in this namespace: unshare makes every mount private first.
set -eu
host=$1 hosts=$2 kept=$3
shift 3
hostname "$host"
# The node's own view of the names; bound before /tmp is covered, where the file may lie.
mount --bind "$hosts" /etc/hosts
# Node-local /tmp and /dev/shm, as on real nodes. Each kept directory is bound back at its own
# path from a descriptor opened before /tmp was covered; without --no-canonicalize mount would
# resolve /proc/self/fd/N again, inside the new /tmp, and bind an empty directory.
IFS=: read -r -a dirs <<< "$kept"
fds=()
for dir in "${dirs[@]}"; do
    exec {fd}<"$dir"  # bash picks a free descriptor: the daemon's socket is one of ours
    fds+=("$fd")
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
for i in "${!dirs[@]}"; do
    mkdir -p "${dirs[$i]}"
    mount --no-canonicalize --bind "/proc/self/fd/${fds[$i]}" "${dirs[$i]}"
    exec {fds[$i]}<&-
done
cd "${kept%%:*}"
exec "$@"
