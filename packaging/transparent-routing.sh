#!/bin/sh
# Policy routing for Sallyport's transparent impersonation (`impersonation = "transparent"`),
# to run on the AGENT host (as root; nftables and iproute2 required).
#
# In transparent mode the agent connects to a backend FROM THE CLIENT'S OWN ADDRESS (socket
# option IP_TRANSPARENT). The backend answers that address, so:
#   1. the BACKEND host must route client addresses back through the agent host, e.g.
#        ip route add default via <agent-ip>           # backend whose clients are all external
#      or  ip route add 198.51.100.0/24 via <agent-ip> # only some client networks
#   2. the AGENT host must hand those replies to the agent's sockets instead of forwarding them:
#      packets that belong to a local transparent socket get a firewall mark, and marked
#      packets are routed to the local host. That is what this script sets up.
#
# usage: transparent-routing.sh up|down|status [MARK] [TABLE]
#   MARK  firewall mark for the replies (default 0x5a11)
#   TABLE routing table number used for local delivery (default 5011)
set -eu

action=${1:-status}
mark=${2:-0x5a11}
table=${3:-5011}
nft_table=sallyport_transparent

down() {
    nft delete table ip "$nft_table" 2>/dev/null || true
    while ip rule del fwmark "$mark" lookup "$table" 2>/dev/null; do :; done
    ip route flush table "$table" 2>/dev/null || true
}

case "$action" in
up)
    down
    nft -f - <<NFT
table ip $nft_table {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        # a reply to a connection the agent opened with IP_TRANSPARENT
        meta l4proto tcp socket transparent 1 meta mark set $mark accept
    }
}
NFT
    ip rule add fwmark "$mark" lookup "$table" priority 100
    ip route replace local 0.0.0.0/0 dev lo table "$table"
    echo "transparent routing up: mark $mark, table $table"
    ;;
down)
    down
    echo "transparent routing down"
    ;;
status)
    nft list table ip "$nft_table" 2>/dev/null || echo "no nftables table $nft_table"
    ip rule show | grep "fwmark $mark" || echo "no rule for fwmark $mark"
    ip route show table "$table" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up|down|status [MARK] [TABLE]" >&2
    exit 2
    ;;
esac
