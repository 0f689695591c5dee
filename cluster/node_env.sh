# Sourced by cluster/local.yaml before `ray start` on every node (bash):
#
#   . ~/ldct/cluster/node_env.sh && ray start ... --node-ip-address=$LDCT_NODE_IP
#
# Sets LDCT_NODE_IP, the address this node is known by on the cluster's network, and
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, the interface that carries it, and exports them
# (Ray's workers inherit the raylet's environment). Why: Ray otherwise takes the default route's
# address (or the hostname's, 127.0.1.1 on Debian, on a machine without a default route), and
# gloo (CPU DDP) and NCCL (GPU DDP) pick their own interface: on a machine with two networks,
# or none routed, rank 0 then waits on an address the other hosts cannot reach
# (docs/DESIGN.md §5a).
#
# The address is the one the launcher reached this node at: sshd's SSH_CONNECTION names it
# (third field) in every command `ray up` runs. LDCT_NODE_IP set beforehand wins (a site that
# starts Ray by hand). Fails, naming the address, when no interface carries it.

ldct_node_env() {
    local ip=${LDCT_NODE_IP:-}
    if [ -z "$ip" ]; then
        # shellcheck disable=SC2086  # SSH_CONNECTION is "client_ip client_port server_ip server_port"
        set -- ${SSH_CONNECTION:-}
        ip=${3:-}
    fi
    if [ -z "$ip" ]; then
        echo "node_env.sh: no LDCT_NODE_IP and no SSH_CONNECTION: set LDCT_NODE_IP to this node's cluster address" >&2
        return 1
    fi
    if ! command -v ip >/dev/null; then
        echo "node_env.sh: the ip command (Debian: iproute2) is missing on $(hostname): install it, or set LDCT_NODE_IP and GLOO_SOCKET_IFNAME yourself" >&2
        return 1
    fi
    local ifname
    ifname=$(ip -o addr show 2>/dev/null | awk -v ip="$ip" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
    if [ -z "$ifname" ]; then
        echo "node_env.sh: no network interface of $(hostname) carries $ip (ip -o addr show): set LDCT_NODE_IP to one that does" >&2
        return 1
    fi
    export LDCT_NODE_IP=$ip GLOO_SOCKET_IFNAME=$ifname NCCL_SOCKET_IFNAME=$ifname
}

ldct_node_env
