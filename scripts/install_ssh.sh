#!/usr/bin/env bash
# Installs what the cluster launcher needs on this machine, for tests/test_cluster_multinode.py:
# an SSH client and server (the on-prem provider logs into every host), rsync (file_mounts), ip
# (cluster/node_env.sh, and the test's veth pairs and bridge), curl (the MLflow probe) and nc.
# Idempotent; needs root or passwordless sudo. Debian/Ubuntu only (apt-get).
set -euo pipefail
need=()
command -v ssh >/dev/null || need+=(openssh-client)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
command -v curl >/dev/null || need+=(curl)
command -v nc >/dev/null || need+=(netcat-openbsd)
# ps and pkill inside the two-host test's hosts.
command -v pkill >/dev/null || need+=(procps)
# cluster/node_env.sh finds the interface of the node's address with `ip`.
command -v ip >/dev/null || need+=(iproute2)
if [[ ${#need[@]} -eq 0 ]]; then
    exit 0
fi
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
echo "[install_ssh] apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends: no ssh-askpass / xauth; policy-rc.d-free images do not start sshd here.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
