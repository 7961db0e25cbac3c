#!/bin/bash
# Checks a built agent image on this machine, beyond `--help`: runs it the way
# deploy/base/daemonset.yaml runs the agent (its args, its capabilities, read-only root file
# system, host network and PID namespace, /sys/fs/bpf and /run/netpol from the host) against
# one lab pod and a deny-all NetworkPolicy given as manifests, then removes it the way
# deploy/uninstall does, and fails loudly at the first thing that is not as expected:
#   /readyz and /healthz answer 200; bpftool from the image shows from_pod/to_pod held by links;
#   real TCP: node -> pod allowed, pod -> node denied and counted in /metrics;
#   after SIGTERM the programs stay linked and keep denying (no agent running);
#   `netpol-agent uninstall` from the image detaches them, removes the pins and the status
#   file, and the pod reaches the node again.
# Usage (root, a running docker, socat and curl on the host):
#   deploy/verify-image.sh [IMAGE]        # default netpol-agent:0.1.0; PORT=19818 for metrics
# Lab conventions as in test/netpol-it: netns/veth named npt-img*, addresses only in
# 10.213.250.0/24 behind a blackhole route, a private pin dir (/sys/fs/bpf/netpol-img) so
# other netpol instances on the machine are never touched; everything removed on exit.
set -euo pipefail
IMAGE=${1:-netpol-agent:0.1.0}
PORT=${PORT:-19818}
NS=npt-img; HV=npt-img0; NAME=npt-img-agent
PIN_ROOT=/sys/fs/bpf/netpol-img
D=$(mktemp -d /tmp/netpol-verify-image.XXXXXX)
for tool in docker socat curl ip; do
  command -v $tool >/dev/null || { echo "FAIL: $tool not found"; exit 1; }
done
# The DaemonSet's capabilities. Engines too old to know the names CAP_BPF and CAP_PERFMON
# (docker 20.10, Debian bookworm's docker.io) get SYS_ADMIN and NET_ADMIN alone: the kernel's
# bpf_capable() and perfmon_capable() accept CAP_SYS_ADMIN in their place, so the agent is
# allowed exactly the same.
CAPS="--cap-drop ALL --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON --cap-add SYS_ADMIN"
if ! docker run --rm $CAPS --entrypoint /bin/true "$IMAGE" 2>/dev/null; then
  echo "note: the engine does not know CAP_BPF/CAP_PERFMON; using SYS_ADMIN and NET_ADMIN"
  CAPS="--cap-drop ALL --cap-add NET_ADMIN --cap-add SYS_ADMIN"
fi
# Kubernetes runs the DaemonSet's containers unconfined (no seccompProfile set; AppArmor
# Unconfined is in the manifest).
SEC="--security-opt apparmor=unconfined --security-opt seccomp=unconfined"
bpftool_img() { docker run --rm $CAPS $SEC --network host --pid host -v /sys/fs/bpf:/sys/fs/bpf --entrypoint bpftool "$IMAGE" "$@"; }
cleanup() {
  set +e
  [ -n "${SOCATS:-}" ] && kill $SOCATS 2>/dev/null
  docker rm -f $NAME >/dev/null 2>&1
  ip netns del $NS 2>/dev/null
  ip link del $HV 2>/dev/null
  ip route del 10.213.250.2/32 dev $HV 2>/dev/null
  ip route del blackhole 10.213.250.0/24 2>/dev/null
  [ -d $PIN_ROOT ] && rm -rf $PIN_ROOT
  rm -rf "$D"
}
trap cleanup EXIT
mkdir -p $D/manifests $D/run
ss -ltn | grep -q ":$PORT " && { echo "port $PORT busy"; exit 1; }

echo "== the init container's command (deploy/base/daemonset.yaml, mount-bpffs)"
INIT='mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mountpoint /sys/fs/bpf'
# (privileged in the manifest; SYS_ADMIN is what mount needs)
docker run --rm --cap-drop ALL --cap-add SYS_ADMIN $SEC -v /sys/fs/bpf:/sys/fs/bpf \
  --entrypoint /bin/sh "$IMAGE" -c "$INIT" || { echo "FAIL: with the node's bpffs"; exit 1; }
docker run --rm --cap-drop ALL --cap-add SYS_ADMIN $SEC \
  --entrypoint /bin/sh "$IMAGE" -c "$INIT" || { echo "FAIL: mounting a bpffs"; exit 1; }

echo "== lab: one pod $NS (10.213.250.2) behind $HV"
ip route add blackhole 10.213.250.0/24
ip netns add $NS
ip link add $HV type veth peer name eth0 netns $NS
ip link set $HV up
ip addr add 10.213.250.1/32 dev $HV noprefixroute
ip route add 10.213.250.2/32 dev $HV
ip -n $NS link set lo up; ip -n $NS link set eth0 up
ip -n $NS addr add 10.213.250.2/32 dev eth0
ip -n $NS route add 10.213.250.1/32 dev eth0
ip netns exec $NS socat TCP-LISTEN:8080,bind=10.213.250.2,fork,reuseaddr SYSTEM:'echo pod' &
socat TCP-LISTEN:8081,bind=10.213.250.1,fork,reuseaddr SYSTEM:'echo host' &
SOCATS="$(jobs -p)"
sleep 0.5
probe() { timeout 3 socat -T2 - "TCP:$1,connect-timeout=2" </dev/null 2>/dev/null; }   # probe IP:PORT
host_to_pod() { probe 10.213.250.2:8080; }
pod_to_host() { ip netns exec $NS timeout 3 socat -T2 - TCP:10.213.250.1:8081,connect-timeout=2 </dev/null 2>/dev/null; }
[ "$(host_to_pod)" = pod ] && echo "host -> pod reachable before the agent" || { echo "FAIL: lab broken"; exit 1; }
[ "$(pod_to_host)" = host ] && echo "pod -> host reachable before the agent" || { echo "FAIL: lab broken"; exit 1; }

cat > $D/manifests/ns.yaml <<'EOF'
apiVersion: v1
kind: Namespace
metadata:
  name: npt-img
  labels:
    kubernetes.io/metadata.name: npt-img
EOF
cat > $D/manifests/pod.yaml <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: npt-img
  labels:
    app: web
spec:
  nodeName: img-node
  containers:
  - name: main
    image: lab
status:
  phase: Running
  podIP: 10.213.250.2
  podIPs:
  - ip: 10.213.250.2
EOF
cat > $D/manifests/deny-all.yaml <<'EOF'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: npt-img
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
EOF

echo "== agent from the image, as deploy/base/daemonset.yaml runs it"
docker run -d --name $NAME --network host --pid host \
  --read-only $CAPS $SEC \
  -e NODE_NAME=img-node -e RUST_LOG=info \
  -v /sys/fs/bpf:/sys/fs/bpf -v $D/run:/run/netpol -v $D/manifests:/manifests:ro \
  --entrypoint /usr/local/bin/netpol-agent "$IMAGE" \
  run --node-name=img-node --metrics-addr=127.0.0.1:$PORT --pin-dir=$PIN_ROOT/v1 \
  --status-file=/run/netpol/status.json --log-json --manifests /manifests
ready=""
for i in $(seq 1 60); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then ready=$i; break; fi
  sleep 0.5
done
[ -n "$ready" ] || { docker logs $NAME; echo "FAIL: /readyz never answered"; exit 1; }
echo "/readyz: $(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/readyz) after ~$((ready/2)) s; /healthz: $(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/healthz)"

echo "== attachments (bpftool from the image)"
bpftool_img prog show name from_pod | tee $D/progs.txt
bpftool_img prog show name to_pod | tee -a $D/progs.txt
bpftool_img link show | tee $D/links.txt
# Ours are the programs using the maps pinned in our pin dir (other netpol instances, e.g. tests
# running on this machine, may have programs of the same names loaded).
ep=$(bpftool_img map show pinned $PIN_ROOT/v1/np_ep | awk -F: 'NR==1{print $1}')
ids=$(awk -v ep="$ep" -F: '/^[0-9]+:/{id=$1} /map_ids/{n=split($0,a,/[ ,]+/); for(i=1;i<=n;i++) if(a[i]==ep) print id}' $D/progs.txt)
[ "$(echo $ids | wc -w)" = 2 ] || { echo "FAIL: expected from_pod and to_pod using map $ep, found: $ids"; exit 1; }
for id in $ids; do grep -qE "prog $id\b" $D/links.txt || { echo "FAIL: program $id has no link"; exit 1; }; done
echo "programs $(echo $ids) are each held by a link"

echo "== datapath: host -> pod allowed (node to its pods), pod -> host denied (deny-all egress)"
[ "$(host_to_pod)" = pod ] && echo "host -> pod: reached" || { echo "FAIL: host -> pod blocked"; exit 1; }
if [ "$(pod_to_host)" = host ]; then echo "FAIL: pod -> host reached despite deny-all"; exit 1; fi
echo "pod -> host: blocked"
curl -fsS http://127.0.0.1:$PORT/metrics > $D/metrics.txt
echo "metrics: $(grep -c '^netpol_' $D/metrics.txt) netpol_ sample lines"
grep -E '^netpol_(drop_count_total|endpoints)' $D/metrics.txt | grep -v ' 0$' || true
grep -qE '^netpol_drop_count_total.* [1-9]' $D/metrics.txt || { echo "FAIL: no drops counted"; exit 1; }

echo "== inspect from inside the running container"
docker exec $NAME netpol-agent inspect --pin-dir=$PIN_ROOT/v1 --status-file /run/netpol/status.json 2>&1 | head -15 || true

echo "== stop the agent (SIGTERM, as Kubernetes does)"
docker stop -t 10 $NAME >/dev/null
docker logs $NAME 2>&1 | tail -3
docker rm $NAME >/dev/null
bpftool_img link show > $D/links-after-stop.txt
for id in $ids; do grep -qE "prog $id\b" $D/links-after-stop.txt || { echo "FAIL: program $id lost its link when the agent stopped"; exit 1; }; done
echo "after stop: $(ls $PIN_ROOT/v1 | wc -l) maps pinned in $PIN_ROOT/v1, programs $(echo $ids) still linked"
if [ "$(pod_to_host)" = host ]; then echo "FAIL: pod -> host reached with the agent stopped"; exit 1; fi
echo "pod -> host: still blocked with no agent running (the kernel keeps the last state)"

echo "== uninstall from the image, as deploy/uninstall does"
docker run --rm --network host --pid host \
  --read-only $CAPS $SEC \
  -v /sys/fs/bpf:/sys/fs/bpf -v $D/run:/run/netpol \
  --entrypoint /usr/local/bin/netpol-agent "$IMAGE" \
  uninstall --pin-dir=$PIN_ROOT --status-file=/run/netpol/status.json
bpftool_img link show > $D/links-after-uninstall.txt
bpftool_img prog show > $D/progs-after-uninstall.txt
for id in $ids; do
  grep -qE "prog $id\b" $D/links-after-uninstall.txt && { echo "FAIL: program $id still linked"; exit 1; }
  grep -qE "^$id:" $D/progs-after-uninstall.txt && { echo "FAIL: program $id still loaded"; exit 1; }
done
[ -e $PIN_ROOT ] && { echo "FAIL: $PIN_ROOT left behind"; exit 1; }
[ -e $D/run/status.json ] && { echo "FAIL: status file left behind"; exit 1; }
echo "after uninstall: programs $(echo $ids) neither linked nor loaded, $PIN_ROOT gone, status file gone"
[ "$(pod_to_host)" = host ] && echo "pod -> host reachable again after uninstall" || { echo "FAIL: still blocked after uninstall"; exit 1; }
echo "== OK"
