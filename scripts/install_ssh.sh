#!/usr/bin/env bash
# Installs what the cluster launcher needs on this machine, for tests/test_cluster_launch.py: an
# SSH client and server (the on-prem provider logs into 127.0.0.1), rsync (file_mounts) and ip
# (cluster/node_env.sh).
# Idempotent; needs root or passwordless sudo. Debian/Ubuntu only (apt-get).
set -euo pipefail
need=()
command -v ssh >/dev/null || need+=(openssh-client)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
command -v curl >/dev/null || need+=(curl)
# ProxyCommand of the launch test: sshd listens on a free port, the launcher only speaks port 22.
command -v nc >/dev/null || need+=(netcat-openbsd)
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
