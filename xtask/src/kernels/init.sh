#!/bin/sh
# /init of a `cargo xtask test-kernels` VM: the datapath checks on the kernel under test.
# Prints "RESULT <check> PASS|FAIL <detail>" lines; the host turns them into the table.
# EXPECT=refuse (kernel command line) means the kernel is below the minimum: the agent must
# exit non-zero with one line naming the missing feature, leaving nothing pinned.
# EXPECT=outbound-only: the kernel cannot run inbound (sk_lookup's ingress_ifindex needs 5.17):
# without --inbound=false the agent must refuse the same way (naming the field, 5.17 and the
# flag); with it, every outbound and DNS check must pass and the netns workload is named.
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup; mount -t bpf bpf /sys/fs/bpf
ip link set lo up
for a in 198.18.0.10 198.18.0.11 198.18.0.12 198.18.0.53; do ip addr add $a/32 dev lo; done
for a in fd00:198:18::10 fd00:198:18::11 fd00:198:18::53; do ip -6 addr add $a/128 dev lo; done
CG=/sys/fs/cgroup; PIN=/sys/fs/bpf/redirect; AGENT_LOG=/agent.log
echo +memory > $CG/cgroup.subtree_control 2>/dev/null
for d in mesh mesh/pod1 mesh/pod1/app mesh/pod1/proxy mesh/pod2 mesh/pod3 mesh/pod3/app mesh/pod3/proxy base; do
    mkdir -p $CG/$d
done
# Inbound: the pod "web" (mesh/pod3) has its own netns /podns, joined to this one (the client
# node) by a veth pair; the host side is veth0 (busybox's ip names the peer itself). No DAD, so
# the IPv6 addresses are usable at once.
insmod /lib/veth.ko 2>/dev/null
POD4=198.19.2.2 POD6=fd00:198:19:2::2
touch /podns && unshare --net=/podns true
IN_POD="nsenter --net=/podns" # a command prefix (run_in execs its arguments)
in_pod() { $IN_POD "$@"; }
for ns in "" in_pod; do $ns sh -c 'for c in all default; do echo 0 > /proc/sys/net/ipv6/conf/$c/accept_dad; done'; done
in_pod ip link add vpod type veth && in_pod ip link set veth0 netns 1
in_pod ip link set lo up
in_pod ip addr add $POD4/24 dev vpod; in_pod ip -6 addr add $POD6/64 dev vpod; in_pod ip link set vpod up
ip addr add 198.19.2.1/24 dev veth0; ip -6 addr add fd00:198:19:2::1/64 dev veth0; ip link set veth0 up
EXPECT=$(sed -n 's/.*EXPECT=\([a-z-]*\).*/\1/p' /proc/cmdline)

result() { echo "RESULT $1 $2 $3"; }
# in CGROUP CMD...: runs CMD in $CG/CGROUP.
run_in() { c=$1; shift; sh -c 'echo $$ > '"$CG/$c"'/cgroup.procs && exec "$@"' sh "$@"; }
kcheck_is() { # kcheck_is NAME EXPECTED CGROUP kcheck-args...
    name=$1 want=$2 c=$3; shift 3
    got=$(run_in $c kcheck "$@" 2>&1)
    if [ "$got" = "$want" ]; then result $name PASS; else result $name FAIL "want [$want] got [$got]"; fi
}
check() { n=$1 w=$2 c=$3; shift 3; kcheck_is "$n" "$w" $c conn "$@"; } # a TCP connection
check_peer() { # like check, without the od= field (which the checks of DNS do not assert)
    name=$1 want=$2 c=$3; shift 3
    got=$(run_in $c kcheck conn "$@" 2>&1 | sed 's/ od=[^ ]*//')
    if [ "$got" = "$want" ]; then result $name PASS; else result $name FAIL "want [$want] got [$got]"; fi
}
links_are() { kcheck_is $1 "netns=$2" base links; } # the sk_lookup links on the system
AGENT_ARGS= # --inbound=false on an outbound-only kernel
start_agent() { # waits for the first reconcile ("applied", at debug level when nothing changed)
    REDIRECT_LOG=info,redirect_agent::reconcile=debug run_in base redirect-agent run --source file --config /config.yaml \
        --cgroup-root $CG/mesh --bpffs-dir $PIN $AGENT_ARGS >>$AGENT_LOG 2>&1 &
    # $! is the subshell of run_in; the agent's own pid is what kill -9 must hit.
    for i in $(seq 1 900); do
        AGENT=$(pidof redirect-agent)
        grep -q applied $AGENT_LOG && [ -n "$AGENT" ] && return 0
        [ $i -gt 50 ] && [ -z "$AGENT" ] && return 1
        sleep 0.1
    done
    return 1
}
finish() { echo "=== agent log"; cat $AGENT_LOG; echo "=== end"; poweroff -f; }

cat > /config.yaml <<'YAML'
mesh:
  outboundPortExclusionList: [5432]
  outboundIPRangeExclusionList: ["198.18.0.11/32", "fd00:198:18::11/128"]
proxy: {mode: sidecar, outboundPort: 15001, inboundPort: 15006, uid: 1337}
dns: {capture: true, port: 15053}
workloads:
  - {name: app, namespace: demo, cgroup: /sys/fs/cgroup/mesh/pod1, proxyCgroup: /sys/fs/cgroup/mesh/pod1/proxy}
  - name: restricted
    namespace: demo
    cgroup: /sys/fs/cgroup/mesh/pod2
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.10/32,fd00:198:18::10/128"
      traffic.sidecar.istio.io/includeOutboundPorts: "8443"
  - name: web
    namespace: demo
    cgroup: /sys/fs/cgroup/mesh/pod3
    proxyCgroup: /sys/fs/cgroup/mesh/pod3/proxy
    netns: /podns
    annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "8081"}
YAML

if [ "$EXPECT" = refuse ]; then
    run_in base redirect-agent run --source file --config /config.yaml --cgroup-root $CG/mesh \
        --bpffs-dir $PIN >/dev/null 2>$AGENT_LOG
    rc=$?
    lines=$(grep -c . $AGENT_LOG)
    if [ $rc -ne 0 ] && [ "$lines" = 1 ] && grep -q 'lacks .*redirect needs Linux' $AGENT_LOG; then
        result refused PASS "$(cat $AGENT_LOG)"
    else result refused FAIL "rc=$rc lines=$lines"; fi
    left=$(ls -A $PIN 2>/dev/null | wc -l)
    if [ "$left" = 0 ]; then result nothing_pinned PASS; else result nothing_pinned FAIL "$(ls $PIN)"; fi
    finish
fi
if [ "$EXPECT" = outbound-only ]; then
    run_in base redirect-agent run --source file --config /config.yaml --cgroup-root $CG/mesh \
        --bpffs-dir $PIN >/dev/null 2>$AGENT_LOG
    rc=$?
    lines=$(grep -c . $AGENT_LOG)
    if [ $rc -ne 0 ] && [ "$lines" = 1 ] && grep -q 'lacks the sk_lookup context field ingress_ifindex .*Linux 5.17.*--inbound=false' $AGENT_LOG; then
        result inbound_refused PASS "$(cat $AGENT_LOG)"
    else result inbound_refused FAIL "rc=$rc lines=$lines: $(head -c 300 $AGENT_LOG)"; fi
    left=$(ls -A $PIN 2>/dev/null | wc -l)
    if [ "$left" = 0 ]; then result inbound_refused_nothing_pinned PASS; else result inbound_refused_nothing_pinned FAIL "$(ls $PIN)"; fi
    : > $AGENT_LOG
    AGENT_ARGS=--inbound=false
fi

# Servers outside the mesh tree; the proxy inside it, as uid 1337.
for p in 80 5432 8443; do run_in base kcheck serve 0.0.0.0 $p direct & run_in base kcheck serve :: $p direct & done
run_in mesh/pod1/proxy kcheck serve 127.0.0.1 15001 proxy 1337 &
run_in mesh/pod1/proxy kcheck serve ::1 15001 proxy 1337 &
# DNS: the real server outside the tree (UDP and TCP), the proxy's DNS listener on :15053.
for a in 198.18.0.53 fd00:198:18::53; do
    run_in base kcheck userve $a 53 real & run_in base kcheck serve $a 53 real-tcp &
done
for a in 127.0.0.1 ::1; do
    run_in mesh/pod1/proxy kcheck userve $a 15053 dnsproxy &
    run_in mesh/pod1/proxy kcheck serve $a 15053 dnsproxy-tcp 1337 &
done
# Inbound: the web pod's apps, dual-stack by two listeners each.
for p in 8080 8081; do
    for a in 0.0.0.0 ::; do run_in mesh/pod3/app $IN_POD kcheck iserve $a $p app-$p & done
done
sleep 0.5
baseline=$(run_in base kcheck large)

if start_agent; then result agent_start PASS; else result agent_start FAIL "$(tail -1 $AGENT_LOG)"; finish; fi

datapath() { # the decision steps and original destinations; $1 suffixes the check names
    s=$1
    check redirect_v4$s "proxy od=198.18.0.10:80 peer=198.18.0.10:80" mesh/pod1/app 198.18.0.10 80
    check redirect_v6$s "proxy od=[fd00:198:18::10]:80 peer=[fd00:198:18::10]:80" mesh/pod1/app fd00:198:18::10 80
    check redirect_mapped$s "proxy od=198.18.0.10:80 peer=[::ffff:198.18.0.10]:80" mesh/pod1/app ::ffff:198.18.0.10 80
    kcheck_is dns_udp_v4$s "dnsproxy from=198.18.0.53:53" mesh/pod1/app udp 198.18.0.53 53
}
datapath ""
check bypass_proxy_cgroup "direct od=- peer=198.18.0.10:80" mesh/pod1/proxy 198.18.0.10 80
check bypass_proxy_uid "direct od=- peer=198.18.0.10:80" mesh/pod1/app 198.18.0.10 80 1337
check bypass_port "direct od=- peer=198.18.0.10:5432" mesh/pod1/app 198.18.0.10 5432
check bypass_loopback "direct od=- peer=127.0.0.1:80" mesh/pod1/app 127.0.0.1 80
check bypass_cidr "direct od=- peer=[fd00:198:18::11]:80" mesh/pod1/app fd00:198:18::11 80
check include_port "proxy od=198.18.0.12:8443 peer=198.18.0.12:8443" mesh/pod2 198.18.0.12 8443
check include_cidr "proxy od=198.18.0.10:80 peer=198.18.0.10:80" mesh/pod2 198.18.0.10 80
check not_included "direct od=- peer=198.18.0.12:80" mesh/pod2 198.18.0.12 80
check not_in_mesh "direct od=- peer=198.18.0.10:80" base 198.18.0.10 80

# DNS capture: the workload's queries reach the listener, and the reply comes from the server.
kcheck_is dns_udp_v6 "dnsproxy from=[fd00:198:18::53]:53" mesh/pod1/app udp fd00:198:18::53 53
kcheck_is dns_udp_connected_v4 "dnsproxy peer=198.18.0.53:53" mesh/pod1/app udp 198.18.0.53 53 -1 connected
kcheck_is dns_udp_connected_v6 "dnsproxy peer=[fd00:198:18::53]:53" mesh/pod1/app udp fd00:198:18::53 53 -1 connected
# TCP (glibc's fallback for large answers): the listener accepts it; getpeername shows the server.
check_peer dns_tcp_v4 "dnsproxy-tcp peer=198.18.0.53:53" mesh/pod1/app 198.18.0.53 53
check_peer dns_tcp_v6 "dnsproxy-tcp peer=[fd00:198:18::53]:53" mesh/pod1/app fd00:198:18::53 53
# The proxy's own queries (its cgroup, or its uid) and those from outside the tree go out.
kcheck_is dns_proxy_cgroup "real from=198.18.0.53:53" mesh/pod1/proxy udp 198.18.0.53 53
kcheck_is dns_proxy_uid "real from=[fd00:198:18::53]:53" mesh/pod1/app udp fd00:198:18::53 53 1337
check_peer dns_proxy_tcp "real-tcp peer=198.18.0.53:53" mesh/pod1/proxy 198.18.0.53 53
kcheck_is dns_not_in_mesh "real from=198.18.0.53:53" base udp 198.18.0.53 53

# Inbound (sk_lookup): no proxy listener is refused, never the app; then the proxy listens.
# EXPECT=outbound-only: the agent runs with --inbound=false, so it must name the workload whose
# netns it ignores and attach no link.
inbound() { # $1 suffixes the check names
    [ "$EXPECT" = pass ] || return 0
    check inbound_v4$1 "proxy local=$POD4:8080 od=$POD4:8080 peer=$POD4:8080" base $POD4 8080
    check inbound_v6$1 "proxy local=[$POD6]:8080 od=[$POD6]:8080 peer=[$POD6]:8080" base $POD6 8080
}
if [ "$EXPECT" = pass ]; then
    check inbound_no_listener "connect-error errno=111" base $POD4 8080
    for a in 0.0.0.0 ::; do run_in mesh/pod3/proxy $IN_POD kcheck iserve $a 15006 proxy 1337 & done
    for i in $(seq 1 100); do [ "$(in_pod netstat -ltn | grep -c ':15006 ')" = 2 ] && break; sleep 0.1; done
    inbound ""
    check inbound_excluded_v4 "app-8081 local=$POD4:8081 od=- peer=$POD4:8081" base $POD4 8081
    check inbound_excluded_v6 "app-8081 local=[$POD6]:8081 od=- peer=[$POD6]:8081" base $POD6 8081
    links_are inbound_link 1
else
    if grep -q 'workload demo/web: netns /podns is ignored because inbound interception is off (--inbound=false)' $AGENT_LOG; then
        result inbound_off_named PASS
    else result inbound_off_named FAIL "no warning naming demo/web in the agent log"; fi
    links_are inbound_no_link 0
fi
hooked=$(run_in mesh/pod1/app kcheck large)
if [ "$hooked" = "$baseline" ]; then result large_getsockopt PASS
else result large_getsockopt FAIL "$(echo "$hooked" | tr '\n' ';') vs $(echo "$baseline" | tr '\n' ';')"; fi
if redirect-agent inspect --bpffs-dir $PIN >/inspect.txt 2>&1; then result inspect PASS
else result inspect FAIL "$(tail -1 /inspect.txt)"; fi

kill -9 $AGENT
while pidof redirect-agent >/dev/null; do sleep 0.1; done
datapath _agent_down
inbound _agent_down
: > $AGENT_LOG
if start_agent && grep -q adopted $AGENT_LOG; then result adopt PASS; else result adopt FAIL "$(tail -2 $AGENT_LOG)"; fi
datapath _adopted
inbound _adopted
[ "$EXPECT" = pass ] && links_are inbound_link_adopted 1
kill $AGENT
while pidof redirect-agent >/dev/null; do sleep 0.1; done
if redirect-agent cleanup --bpffs-dir $PIN >/cleanup.txt 2>&1 && [ ! -e $PIN ]; then result cleanup PASS
else result cleanup FAIL "$(cat /cleanup.txt)"; fi
check after_cleanup "direct od=- peer=198.18.0.10:80" mesh/pod1/app 198.18.0.10 80
links_are inbound_link_after_cleanup 0
[ "$EXPECT" = pass ] && check inbound_after_cleanup "app-8080 local=$POD4:8080 od=- peer=$POD4:8080" base $POD4 8080
kcheck_is dns_after_cleanup "real from=198.18.0.53:53" mesh/pod1/app udp 198.18.0.53 53
finish
