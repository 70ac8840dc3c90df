#!/bin/sh
# /init of a `cargo xtask test-kernels` VM: the datapath checks on the kernel under test.
# Prints "RESULT <check> PASS|FAIL <detail>" lines; the host turns them into the table.
# EXPECT=refuse (kernel command line) means the kernel is below the minimum: the agent must
# exit non-zero with one line naming the missing feature, leaving nothing pinned.
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup; mount -t bpf bpf /sys/fs/bpf
ip link set lo up
for a in 198.18.0.10 198.18.0.11 198.18.0.12; do ip addr add $a/32 dev lo; done
for a in fd00:198:18::10 fd00:198:18::11; do ip -6 addr add $a/128 dev lo; done
CG=/sys/fs/cgroup; PIN=/sys/fs/bpf/redirect; AGENT_LOG=/agent.log
echo +memory > $CG/cgroup.subtree_control 2>/dev/null
for d in mesh mesh/pod1 mesh/pod1/app mesh/pod1/proxy mesh/pod2 base; do mkdir -p $CG/$d; done
EXPECT=$(sed -n 's/.*EXPECT=\([a-z]*\).*/\1/p' /proc/cmdline)

result() { echo "RESULT $1 $2 $3"; }
# in CGROUP CMD...: runs CMD in $CG/CGROUP.
run_in() { c=$1; shift; sh -c 'echo $$ > '"$CG/$c"'/cgroup.procs && exec "$@"' sh "$@"; }
check() { # check NAME EXPECTED CGROUP kcheck-args...
    name=$1 want=$2 c=$3; shift 3
    got=$(run_in $c kcheck conn "$@" 2>&1)
    if [ "$got" = "$want" ]; then result $name PASS; else result $name FAIL "want [$want] got [$got]"; fi
}
start_agent() { # waits for the first reconcile ("applied", at debug level when nothing changed)
    REDIRECT_LOG=info,redirect_agent::reconcile=debug run_in base redirect-agent run --source file --config /config.yaml \
        --cgroup-root $CG/mesh --bpffs-dir $PIN >>$AGENT_LOG 2>&1 &
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
proxy: {mode: sidecar, outboundPort: 15001, uid: 1337}
workloads:
  - {name: app, namespace: demo, cgroup: /sys/fs/cgroup/mesh/pod1, proxyCgroup: /sys/fs/cgroup/mesh/pod1/proxy}
  - name: restricted
    namespace: demo
    cgroup: /sys/fs/cgroup/mesh/pod2
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.10/32,fd00:198:18::10/128"
      traffic.sidecar.istio.io/includeOutboundPorts: "8443"
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

# Servers outside the mesh tree; the proxy inside it, as uid 1337.
for p in 80 5432 8443; do run_in base kcheck serve 0.0.0.0 $p direct & run_in base kcheck serve :: $p direct & done
run_in mesh/pod1/proxy kcheck serve 127.0.0.1 15001 proxy 1337 &
run_in mesh/pod1/proxy kcheck serve ::1 15001 proxy 1337 &
sleep 0.5
baseline=$(run_in base kcheck large)

if start_agent; then result agent_start PASS; else result agent_start FAIL "$(tail -1 $AGENT_LOG)"; finish; fi

datapath() { # the decision steps and original destinations; $1 suffixes the check names
    s=$1
    check redirect_v4$s "proxy od=198.18.0.10:80 peer=198.18.0.10:80" mesh/pod1/app 198.18.0.10 80
    check redirect_v6$s "proxy od=[fd00:198:18::10]:80 peer=[fd00:198:18::10]:80" mesh/pod1/app fd00:198:18::10 80
    check redirect_mapped$s "proxy od=198.18.0.10:80 peer=[::ffff:198.18.0.10]:80" mesh/pod1/app ::ffff:198.18.0.10 80
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
hooked=$(run_in mesh/pod1/app kcheck large)
if [ "$hooked" = "$baseline" ]; then result large_getsockopt PASS
else result large_getsockopt FAIL "$(echo "$hooked" | tr '\n' ';') vs $(echo "$baseline" | tr '\n' ';')"; fi
if redirect-agent inspect --bpffs-dir $PIN >/inspect.txt 2>&1; then result inspect PASS
else result inspect FAIL "$(tail -1 /inspect.txt)"; fi

kill -9 $AGENT
while pidof redirect-agent >/dev/null; do sleep 0.1; done
datapath _agent_down
: > $AGENT_LOG
if start_agent && grep -q adopted $AGENT_LOG; then result adopt PASS; else result adopt FAIL "$(tail -2 $AGENT_LOG)"; fi
datapath _adopted
kill $AGENT
while pidof redirect-agent >/dev/null; do sleep 0.1; done
if redirect-agent cleanup --bpffs-dir $PIN >/cleanup.txt 2>&1 && [ ! -e $PIN ]; then result cleanup PASS
else result cleanup FAIL "$(cat /cleanup.txt)"; fi
check after_cleanup "direct od=- peer=198.18.0.10:80" mesh/pod1/app 198.18.0.10 80
finish
