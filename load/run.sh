#!/usr/bin/env bash
# keygate load test: one route, one upstream, measured three ways on this machine —
#   direct   the upstream itself (a separate nginx answering 200 "ok\n");
#   nginx    nginx as a keep-alive reverse proxy with a static X-Appwrite-Key/Project check;
#   keygate  the release build, the whole Appwrite route map included, one key in SQLite.
# Throughput: wrk with fixed connections. Latency: oha at a fixed offered rate (with latency
# correction), the same rate for all three. Prints one table; see load/README.md.
#
# Knobs (environment): DURATION (s, default 15), WARMUP (s, 3), CONNS (64), THREADS (2),
# RATE (req/s for the latency run; default RATE_PERCENT of the lower proxy throughput),
# RATE_PERCENT (50), LAT_CONNS (32), ROUNDS (3: each measurement repeated, medians reported),
# BASE_PORT (18480), QUIET_BUSY (% CPU that other processes may use for the machine to count as
# quiet, 25), QUIET_WAIT (s to wait for quiet, 1200),
# SKIP_BUILD=1 (use target/release/keygate as it is), INSTRUCTIONS=1 (then also count the
# instructions each proxy executes per request under callgrind; see load/README.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD="$ROOT/load"
TOOLS="$LOAD/.tools"
KEYGATE="$ROOT/target/release/keygate"
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
RATE=${RATE:-}
RATE_PERCENT=${RATE_PERCENT:-50}
LAT_CONNS=${LAT_CONNS:-32}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-18480}
QUIET_BUSY=${QUIET_BUSY:-25}
QUIET_WAIT=${QUIET_WAIT:-1200}
ROUTE=/v1/databases/6650f0e2a1/collections/orders/documents
TARGETS=(direct nginx keygate)

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- tools -------------------------------------------------------------------------------------
need_apt() { # binary package
    command -v "$1" >/dev/null 2>&1 && return
    log "installing $2 with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
}
PATH="$PATH:/usr/sbin"
need_apt nginx nginx
need_apt wrk wrk
need_apt ss iproute2
need_apt curl curl
if [[ -x "$TOOLS/bin/oha" ]]; then
    OHA="$TOOLS/bin/oha"
elif command -v oha >/dev/null 2>&1; then
    OHA=$(command -v oha)
else
    log "installing oha into $TOOLS (cargo install oha --locked)"
    cargo install oha --locked --root "$TOOLS" >&2
    OHA="$TOOLS/bin/oha"
fi
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building keygate (release)"
    (cd "$ROOT" && cargo build --release --bin keygate >&2)
fi
[[ -x "$KEYGATE" ]] || die "$KEYGATE is missing"

# --- processes and cleanup --------------------------------------------------------------------
TMP=$(mktemp -d /tmp/keygate-load.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        # nginx masters stop their workers on QUIT/TERM; keygate shuts down on TERM.
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- ports ------------------------------------------------------------------------------------
port_free() { [[ -z "$(ss -Htln "sport = :$1")" ]]; }
PORTS=()
p=$BASE_PORT
while ((${#PORTS[@]} < 4)); do
    ((p < BASE_PORT + 200)) || die "no 4 free ports in $BASE_PORT-$((BASE_PORT + 199))"
    if port_free "$p"; then PORTS+=("$p"); fi
    p=$((p + 1))
done
UP_PORT=${PORTS[0]} NGINX_PORT=${PORTS[1]} KG_PORT=${PORTS[2]} KG_OPS=${PORTS[3]}
log "ports: upstream $UP_PORT, nginx $NGINX_PORT, keygate $KG_PORT (ops $KG_OPS); temp dir $TMP"

wait_http() { # url expected-status
    for _ in $(seq 300); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" == "$2" ]] && return 0
        sleep 0.1
    done
    die "$1 did not answer $2"
}

# --- machine quietness: CPU busy % over 3 s while nothing of ours is under load -----------------
cpu_busy() {
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 3
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local total=0 idle i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    idle=$((b[4] - a[4] + b[5] - a[5]))
    echo $(((total - idle) * 100 / (total > 0 ? total : 1)))
}
QUIET_NOTE=()
wait_quiet() { # label
    local busy waited=0
    busy=$(cpu_busy)
    while ((busy > QUIET_BUSY && waited < QUIET_WAIT)); do
        log "machine busy (${busy}% CPU used by others, load $(cut -d' ' -f1-3 /proc/loadavg)); waiting"
        sleep 30
        waited=$((waited + 33))
        busy=$(cpu_busy)
    done
    if ((busy > QUIET_BUSY)); then
        QUIET_NOTE+=("$1: NOT quiet (${busy}% busy)")
    else
        QUIET_NOTE+=("$1: quiet (${busy}% busy)")
    fi
    log "$1: others use ${busy}% CPU (load $(cut -d' ' -f1-3 /proc/loadavg))"
}

# --- the upstream: nginx, one worker, 200 "ok\n" -----------------------------------------------
nginx_common() { # dir
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
EOF
}
nginx_http_common() { # dir
    cat <<EOF
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}
mkdir -p "$TMP/up" "$TMP/nginx" "$TMP/keygate"
{
    echo "worker_processes 1;"
    nginx_common "$TMP/up"
    echo "http {"
    nginx_http_common "$TMP/up"
    cat <<EOF
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
} >"$TMP/up/nginx.conf"
nginx -t -q -p "$TMP/up" -e "$TMP/up/error.log" -c "$TMP/up/nginx.conf"
nginx -p "$TMP/up" -e "$TMP/up/error.log" -c "$TMP/up/nginx.conf" &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "http://127.0.0.1:$UP_PORT$ROUTE" 200

# --- keygate: the Appwrite map, one key, forward_key: false ------------------------------------
cat >"$TMP/keygate/keygate.yaml" <<EOF
include: ["$ROOT/config/appwrite.yaml"]
server: { listen: "127.0.0.1:$KG_PORT", workers: 2 }
ops: { listen: "127.0.0.1:$KG_OPS" }
store: { url: "sqlite://$TMP/keygate/keys.db" }
projects:
  demo: {}
keys:
  implicit_scopes: [global, health.read, graphql]
# Appwrite's guests role may list documents; here, as in the nginx config, only the key may.
guest_scopes: []
upstreams:
  up: { url: "http://127.0.0.1:$UP_PORT", forward_key: false, timeout: 30s }
routes: []
EOF
KEY_JSON=$(KEYGATE_LOG=warn "$KEYGATE" keys create --config "$TMP/keygate/keygate.yaml" \
    --project demo --name load --scopes documents.read)
SECRET=$(printf '%s' "$KEY_JSON" | sed -n 's/.*"secret" *: *"\([^"]*\)".*/\1/p')
[[ "$SECRET" == standard_* ]] || die "no secret in: $KEY_JSON"
KEYGATE_LOG=warn "$KEYGATE" serve --config "$TMP/keygate/keygate.yaml" \
    >"$TMP/keygate/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=("$KG_PID")
wait_http "http://127.0.0.1:$KG_OPS/readyz" 200

# --- nginx proxy: same route, same key check, keep-alive pool to the upstream ------------------
{
    echo "worker_processes 2;"
    nginx_common "$TMP/nginx"
    echo "http {"
    nginx_http_common "$TMP/nginx"
    cat <<EOF
    map_hash_bucket_size 512;
    map \$http_x_appwrite_key \$key_ok { default 0; "$SECRET" 1; }
    map \$http_x_appwrite_project \$project_ok { default 0; "demo" 1; }
    upstream up {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location ~ ^/v1/databases/[^/]+/collections/[^/]+/documents\$ {
            if (\$request_method != GET) { return 404; }
            if (\$key_ok = 0) { return 401; }
            if (\$project_ok = 0) { return 403; }
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # As keygate with forward_key: false: the key is not sent upstream.
            proxy_set_header X-Appwrite-Key "";
            proxy_set_header X-Forwarded-For \$remote_addr;
        }
        location / { return 404; }
    }
}
EOF
} >"$TMP/nginx/nginx.conf"
nginx -t -q -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

declare -A URL=(
    [direct]="http://127.0.0.1:$UP_PORT$ROUTE"
    [nginx]="http://127.0.0.1:$NGINX_PORT$ROUTE"
    [keygate]="http://127.0.0.1:$KG_PORT$ROUTE"
)
declare -A PID=([direct]=$UP_PID [nginx]=$NGINX_PID [keygate]=$KG_PID)
H_KEY="X-Appwrite-Key: $SECRET"
H_PROJECT="X-Appwrite-Project: demo"

# --- sanity: both proxies allow the key and refuse what they should ---------------------------
check() { # label expected url [curl args...]
    local label=$1 want=$2 url=$3 got
    shift 3
    got=$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true)
    [[ "$got" == "$want" ]] || die "$label: expected $want, got $got"
}
wait_http "${URL[nginx]}" 401
for t in nginx keygate; do
    [[ "$(curl -s -H "$H_KEY" -H "$H_PROJECT" "${URL[$t]}")" == ok ]] || die "$t did not forward"
    check "$t without key" 401 "${URL[$t]}"
    check "$t wrong key" 401 "${URL[$t]}" -H "X-Appwrite-Key: standard_nope" -H "$H_PROJECT"
    check "$t wrong project" 403 "${URL[$t]}" -H "$H_KEY" -H "X-Appwrite-Project: other"
    check "$t other route" 404 "${URL[$t]}x" -H "$H_KEY" -H "$H_PROJECT"
done
log "sanity checks passed (200 with the key; 401 without/wrong key; 403 wrong project; 404 elsewhere)"

# --- helpers: units and /proc ------------------------------------------------------------------
to_ms() { # wrk duration like 310.00us, 1.20ms, 2.00s
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}
rss_mb() { # pid: VmRSS of the process and its children (nginx workers), MB
    local total=0 p kb
    for p in "$1" $(pgrep -P "$1" || true); do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v k="$total" 'BEGIN { printf "%.1f", k / 1024 }'
}

cpu_ticks() { # pid: "utime stime" of the process and its children (nginx workers), clock ticks
    local user=0 sys=0 p u s
    for p in "$1" $(pgrep -P "$1" || true); do
        read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo 0 0)
        user=$((user + ${u:-0}))
        sys=$((sys + ${s:-0}))
    done
    echo "$user $sys"
}
CLK_TCK=$(getconf CLK_TCK)
cpu_us_per_request() { # clock-ticks requests: microseconds of CPU per request
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }'
}

# --- rounds and medians ------------------------------------------------------------------------
# Each measurement is taken ROUNDS times. Odd rounds go direct, nginx, keygate; even rounds the
# other way, so a drift in the machine's speed during the run weighs on the three alike. A
# target's figure is the median of its rounds; a ratio is the median of the rounds' ratios (each
# round's keygate figure over the same round's nginx or direct figure, taken minutes apart).
order() { # round
    if (($1 % 2)); then echo direct nginx keygate; else echo keygate nginx direct; fi
}
median() { # printf-format values...
    local format=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v f="$format" '{ v[NR] = $1 }
        END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf f, m }'
}
declare -A M # M[metric,target,round]
median_of() { # format metric target
    local values=() r
    for ((r = 1; r <= ROUNDS; r++)); do values+=("${M[$2,$3,$r]}"); done
    median "$1" "${values[@]}"
}
ratio() { # a b [printf-format]: a / b, or "nan"
    awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (b > 0) printf f, a / b; else print "nan" }'
}
paired_ratio() { # metric base: the median over rounds of keygate/base
    local values=() r
    for ((r = 1; r <= ROUNDS; r++)); do values+=("$(ratio "${M[$1,keygate,$r]}" "${M[$1,$2,$r]}" '%.4f')"); done
    if [[ " ${values[*]} " == *" nan "* ]]; then echo -; else median '%.2f' "${values[@]}"; fi
}

# --- throughput: wrk, fixed connections --------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
    for t in $(order "$round"); do
        wait_quiet "wrk $t #$round"
        wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -H "$H_KEY" -H "$H_PROJECT" "${URL[$t]}" >/dev/null
        read -r user0 sys0 < <(cpu_ticks "${PID[$t]}")
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "$H_KEY" -H "$H_PROJECT" "${URL[$t]}")
        read -r user1 sys1 < <(cpu_ticks "${PID[$t]}")
        printf '%s\n' "$out" >"$TMP/wrk-$t-$round.txt"
        if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
            printf '%s\n' "$out" >&2
            die "wrk $t: errors or non-2xx responses"
        fi
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        M[rps,$t,$round]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
        M[wrk_p50,$t,$round]=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        M[wrk_p99,$t,$round]=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
        M[user,$t,$round]=$(cpu_us_per_request $((user1 - user0)) "$requests")
        M[sys,$t,$round]=$(cpu_us_per_request $((sys1 - sys0)) "$requests")
        M[cpu,$t,$round]=$(cpu_us_per_request $((user1 - user0 + sys1 - sys0)) "$requests")
        log "wrk $t #$round: ${M[rps,$t,$round]} req/s, p50 ${M[wrk_p50,$t,$round]} ms," \
            "p99 ${M[wrk_p99,$t,$round]} ms, ${M[cpu,$t,$round]} CPU us/req" \
            "(user ${M[user,$t,$round]}, system ${M[sys,$t,$round]})"
    done
done

# --- latency: oha at one fixed offered rate ------------------------------------------------------
if [[ -z "$RATE" ]]; then
    lower=$(median_of '%.0f' rps nginx)
    kg=$(median_of '%.0f' rps keygate)
    if ((kg < lower)); then lower=$kg; fi
    RATE=$((lower * RATE_PERCENT / 100))
fi
for ((round = 1; round <= ROUNDS; round++)); do
    for t in $(order "$round"); do
        wait_quiet "oha $t #$round"
        "$OHA" --no-tui --output-format json -z "${DURATION}s" -q "$RATE" --latency-correction \
            -c "$LAT_CONNS" -H "$H_KEY" -H "$H_PROJECT" "${URL[$t]}" >"$TMP/oha-$t-$round.json"
        read -r ok rps p50 p99 < <(python3 - "$TMP/oha-$t-$round.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
# Requests still in flight when -z ends are cut off; that is not a failure.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
ok = 1 if set(codes) == {"200"} and not errors else 0
if not ok:
    print(f"status codes {codes}, errors {errors}", file=sys.stderr)
s, p = d["summary"], d["latencyPercentiles"]
print(ok, round(s["requestsPerSec"]), f'{p["p50"] * 1e3:.3f}', f'{p["p99"] * 1e3:.3f}')
PY
        )
        [[ "$ok" == 1 ]] || die "oha $t: errors or non-200 responses (see $TMP/oha-$t-$round.json)"
        M[oha_rps,$t,$round]=$rps M[oha_p50,$t,$round]=$p50 M[oha_p99,$t,$round]=$p99
        log "oha $t #$round at $RATE req/s: achieved $rps req/s, p50 $p50 ms, p99 $p99 ms"
    done
done
declare -A RSS
for t in "${TARGETS[@]}"; do RSS[$t]=$(rss_mb "${PID[$t]}"); done

# --- the table ----------------------------------------------------------------------------------
COLUMNS_=(rps cpu user sys wrk_p50 wrk_p99 oha_p50 oha_p99 oha_rps)
FORMATS=('%.0f' '%.1f' '%.1f' '%.1f' '%.3f' '%.3f' '%.3f' '%.3f' '%.0f')
echo
echo "keygate load test — $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $("$OHA" --version)"
echo "route: GET $ROUTE (keygate: full Appwrite map, $("$KEYGATE" --version 2>/dev/null || echo keygate))"
echo "throughput: wrk -t$THREADS -c$CONNS -d${DURATION}s (after ${WARMUP}s warm-up);" \
    "latency: oha -q $RATE --latency-correction -c $LAT_CONNS -z ${DURATION}s;" \
    "$ROUNDS round(s), medians"
echo "quiet: $(printf '%s; ' "${QUIET_NOTE[@]}")"
echo
ROW='| %-10s | %10s | %11s | %7s | %7s | %10s | %10s | %10s | %10s | %9s | %7s |\n'
# shellcheck disable=SC2059
printf "$ROW" target "wrk req/s" "CPU us/req" "user us" "sys us" "wrk p50 ms" "wrk p99 ms" "oha p50 ms" "oha p99 ms" "oha req/s" "RSS MB"
# shellcheck disable=SC2059
printf "$ROW" --- ---: ---: ---: ---: ---: ---: ---: ---: ---: ---:
for t in "${TARGETS[@]}"; do
    cells=()
    for i in "${!COLUMNS_[@]}"; do cells+=("$(median_of "${FORMATS[$i]}" "${COLUMNS_[$i]}" "$t")"); done
    # shellcheck disable=SC2059
    printf "$ROW" "$t" "${cells[@]}" "${RSS[$t]}"
done
for base in nginx direct; do
    cells=()
    for metric in "${COLUMNS_[@]}"; do cells+=("$(paired_ratio "$metric" "$base")"); done
    # shellcheck disable=SC2059
    printf "$ROW" "kg/$base" "${cells[@]}" "$(ratio "${RSS[keygate]}" "${RSS[$base]}")"
done
echo
echo "CPU us/req: CPU time of the proxy during the wrk run / requests (direct: the upstream"
echo "nginx's), then its user-space and kernel parts. RSS: VmRSS after the runs (nginx: master +"
echo "workers added up; direct: the upstream nginx). wrk, oha, the proxies and the upstream share"
echo "the machine's CPUs. Figures are medians over the rounds; kg/ rows are medians of each"
echo "round's ratio."
if ((ROUNDS > 1)); then
    echo
    echo "rounds (wrk req/s; oha p99 ms):"
    for ((round = 1; round <= ROUNDS; round++)); do
        printf '  #%d  direct %s, nginx %s, keygate %s req/s (kg/nginx %s);' "$round" \
            "${M[rps,direct,$round]}" "${M[rps,nginx,$round]}" "${M[rps,keygate,$round]}" \
            "$(ratio "${M[rps,keygate,$round]}" "${M[rps,nginx,$round]}")"
        printf '  p99 direct %s, nginx %s, keygate %s (kg/nginx %s)\n' \
            "${M[oha_p99,direct,$round]}" "${M[oha_p99,nginx,$round]}" "${M[oha_p99,keygate,$round]}" \
            "$(ratio "${M[oha_p99,keygate,$round]}" "${M[oha_p99,nginx,$round]}")"
    done
fi

# --- optional: instructions per request under callgrind ----------------------------------------
# Noise-free where the timings above are not: the same binary and inputs count the same whatever
# else the machine does. Each proxy runs alone in one process (nginx: master_process off, one
# worker; keygate: one worker thread), serves N1 and then N2 requests from oha in two runs, and
# the difference of the two totals over N2 - N1 is its cost per request (start-up cancels out).
# Valgrind does not expose SHA extensions, so keygate's SHA-256 of the key runs in software here:
# it is shown apart, since on the CPU it runs on SHA-NI at a small fraction of that.
if [[ "${INSTRUCTIONS:-0}" == 1 ]]; then
    need_apt valgrind valgrind
    N1=${N1:-2000}
    N2=${N2:-12000}
    for pid in "$NGINX_PID" "$KG_PID"; do
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    sed -e 's/^worker_processes 2;/worker_processes 1;\nmaster_process off;/' \
        "$TMP/nginx/nginx.conf" >"$TMP/nginx/single.conf"
    sed -e 's/workers: 2/workers: 1/' "$TMP/keygate/keygate.yaml" >"$TMP/keygate/single.yaml"
    declare -A TOTAL SHA
    for t in nginx keygate; do
        for n in "$N1" "$N2"; do
            out="$TMP/callgrind-$t-$n"
            if [[ $t == nginx ]]; then
                valgrind --tool=callgrind --callgrind-out-file="$out" \
                    nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/single.conf" \
                    >"$TMP/valgrind-$t.log" 2>&1 &
            else
                KEYGATE_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
                    "$KEYGATE" serve --config "$TMP/keygate/single.yaml" \
                    >"$TMP/valgrind-$t.log" 2>&1 &
            fi
            vpid=$!
            PIDS+=("$vpid")
            wait_http "${URL[$t]}" 401
            "$OHA" --no-tui --output-format json -n "$n" -c 8 -H "$H_KEY" -H "$H_PROJECT" \
                "${URL[$t]}" >"$TMP/oha-callgrind.json"
            ok=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(int(d["statusCodeDistribution"] == {"200": int(sys.argv[2])}))' \
                "$TMP/oha-callgrind.json" "$n")
            [[ "$ok" == 1 ]] || die "callgrind $t: not all $n requests answered 200"
            # nginx stops gracefully on QUIT, keygate on TERM; callgrind writes its file at exit.
            kill "-$([[ $t == nginx ]] && echo QUIT || echo TERM)" "$vpid"
            wait "$vpid" || true
            TOTAL[$t-$n]=$(sed -n 's/^summary: //p' "$out")
            SHA[$t-$n]=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
                awk '!found && /sha2::sha256::compress256/ { gsub(",", "", $1); print $1; found = 1 }')
            log "callgrind $t, $n requests: ${TOTAL[$t-$n]} instructions"
        done
    done
    per_request() { # total1 total2
        awk -v a="${1:-0}" -v b="${2:-0}" -v n="$((N2 - N1))" 'BEGIN { printf "%.0f", (b - a) / n }'
    }
    NG=$(per_request "${TOTAL[nginx-$N1]}" "${TOTAL[nginx-$N2]}")
    KG=$(per_request "${TOTAL[keygate-$N1]}" "${TOTAL[keygate-$N2]}")
    KG_SHA=$(per_request "${SHA[keygate-$N1]:-0}" "${SHA[keygate-$N2]:-0}")
    echo
    echo "instructions per request (callgrind, one process each, oha -c 8, runs of $N1 and $N2):"
    echo "  nginx   $NG"
    echo "  keygate $KG, of which SHA-256 in software $KG_SHA; without it $((KG - KG_SHA))" \
        "($(ratio "$((KG - KG_SHA))" "$NG") x nginx)"
fi
