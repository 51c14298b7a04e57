#!/bin/sh
# The setup of one simulated node (tests/simnodes.py), run by unshare as PID 1 of new PID, UTS
# and mount namespaces whose /proc unshare has mounted already; it ends by exec'ing the daemon,
# which stays PID 1.  usage: node.sh HOSTNAME HOSTS_FILE SHARED_DIR DAEMON_COMMAND...
# Its mounts stay in this namespace: unshare makes every mount private first.
set -eu
host=$1 hosts=$2 shared=$3
shift 3
hostname "$host"
# The node's own view of the names; bound before /tmp is covered, where the file may lie.
mount --bind "$hosts" /etc/hosts
# Node-local /tmp and /dev/shm, as on real nodes. The shared directory, usually under /tmp,
# is bound back at its own path from a descriptor opened before /tmp was covered; without
# --no-canonicalize mount would resolve /proc/self/fd/9 again, inside the new /tmp, and bind
# an empty directory.
exec 9<"$shared"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mkdir -p "$shared"
mount --no-canonicalize --bind /proc/self/fd/9 "$shared"
exec 9<&-
cd "$shared"
exec "$@"
