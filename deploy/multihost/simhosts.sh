#!/bin/bash
# Simulated hosts on one machine: each host is a network namespace with one veth link to a
# bridge, the bridge is the network, and the machine itself (the root namespace) sits on it
# as the gateway and consumer host. Addresses 10.200.0.0/24 exist only inside these namespaces.
set -euo pipefail

usage() {
    cat <<'TEXT'
Usage: deploy/multihost/simhosts.sh COMMAND [ARGS]

  up HOST=LAST_OCTET ...   create the bridge (10.200.0.1 is this machine) and one namespace
                           per host, e.g. `up fwd=10 shard1=11 shard2=12` gives host fwd the
                           address 10.200.0.10; run a program there with `ip netns exec sgc-fwd ...`
  cut HOST [PEER]          take the host's link down (its processes and sockets live on), or
                           with PEER drop only the traffic between the two hosts (nftables)
  restore HOST             undo `cut`
  off HOST                 power the host off: link down, every process in it SIGKILLed, its
                           network stack destroyed, so no FIN or RST ever reaches its peers
  on HOST=LAST_OCTET       power it on again: a fresh namespace with the same address
  loss HOST PERCENT        drop PERCENT % of the packets the host receives (nftables); 0 removes it
  rate HOST RATE           limit what the host sends to RATE (tc tbf, e.g. 1mbit); "off" removes it
  down                     remove every simulated host and the bridge
  pids HOST                the processes running in the host

Needs root, iproute2 and (for loss) nftables. Namespaces are named sgc-HOST, links sgc-HOST-br.
TEXT
}

BRIDGE=sgc-br0
NET=10.200.0

ns() { echo "sgc-$1"; }

host_on() {
    local name=${1%%=*} octet=${1#*=}
    local netns; netns=$(ns "$name")
    ip netns add "$netns"
    # A fixed MAC per address, as a rebooted machine keeps its NIC's: a new random one would
    # leave its peers' ARP caches pointing at a host that no longer exists for several seconds.
    ip link add "sgc-$name-br" type veth peer name eth0 address "$(printf '02:00:0a:c8:00:%02x' "$octet")" netns "$netns"
    ip link set "sgc-$name-br" master "$BRIDGE" up
    ip -n "$netns" addr add "$NET.$octet/24" dev eth0
    ip -n "$netns" link set lo up
    ip -n "$netns" link set eth0 up
}

host_off() {
    local netns; netns=$(ns "$1")
    ip link set "sgc-$1-br" down 2>/dev/null || true
    local pids; pids=$(ip netns pids "$netns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    # The link goes before the namespace (whose teardown the kernel finishes later), so its
    # sockets die with no way out: the peers hear no FIN or RST, as when a machine loses power.
    ip link del "sgc-$1-br" 2>/dev/null || true
    ip netns del "$netns" 2>/dev/null || true
}

case "${1:-}" in
    up)
        shift
        ip link show "$BRIDGE" >/dev/null 2>&1 || {
            ip link add "$BRIDGE" type bridge
            ip addr add "$NET.1/24" dev "$BRIDGE"
            ip link set "$BRIDGE" up
        }
        for spec in "$@"; do host_on "$spec"; done
        ;;
    cut)
        if [ $# -eq 2 ]; then ip link set "sgc-$2-br" down; exit; fi
        netns=$(ns "$2")
        peer=$(ip -n "$(ns "$3")" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
        ip netns exec "$netns" nft add table inet sgc_cut
        ip netns exec "$netns" nft add chain inet sgc_cut input '{ type filter hook input priority 0; }'
        ip netns exec "$netns" nft add chain inet sgc_cut output '{ type filter hook output priority 0; }'
        ip netns exec "$netns" nft add rule inet sgc_cut input ip saddr "$peer" drop
        ip netns exec "$netns" nft add rule inet sgc_cut output ip daddr "$peer" drop
        ;;
    restore)
        ip link set "sgc-$2-br" up
        ip netns exec "$(ns "$2")" nft delete table inet sgc_cut 2>/dev/null || true
        ;;
    off) host_off "$2" ;;
    on) host_on "$2" ;;
    loss)
        netns=$(ns "$2")
        ip netns exec "$netns" nft delete table inet sgc_loss 2>/dev/null || true
        if [ "$3" != 0 ]; then
            ip netns exec "$netns" nft add table inet sgc_loss
            ip netns exec "$netns" nft add chain inet sgc_loss input '{ type filter hook input priority 0; }'
            ip netns exec "$netns" nft add rule inet sgc_loss input iifname eth0 numgen random mod 100 '<' "$3" drop
        fi
        ;;
    rate)
        netns=$(ns "$2")
        ip netns exec "$netns" tc qdisc del dev eth0 root 2>/dev/null || true
        [ "$3" = off ] || ip netns exec "$netns" tc qdisc add dev eth0 root tbf rate "$3" burst 32kbit latency 400ms
        ;;
    pids) ip netns pids "$(ns "$2")" ;;
    down)
        for netns in $(ip netns list | awk '/^sgc-/ {print $1}'); do host_off "${netns#sgc-}"; done
        for link in $(ip -o link show | awk -F'[ :@]+' '$2 ~ /^sgc-.*-br$/ {print $2}'); do ip link del "$link"; done
        ip link del "$BRIDGE" 2>/dev/null || true
        ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
