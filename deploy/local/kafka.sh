#!/usr/bin/env bash
# Local single-node Kafka (KRaft, broker+controller in one JVM) for supportlens.
#
#   deploy/local/kafka.sh fetch | start | stop | status | bootstrap
#
# Only Maven Central is reachable from our machines, so instead of the Kafka
# tarball we resolve the broker's jars with Maven (deploy/local/pom.xml) and run
# kafka.Kafka straight from that classpath.
set -euo pipefail

KAFKA_VERSION=4.1.2

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/log4j2.properties"

SUPPORTLENS_STATE_DIR="${SUPPORTLENS_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/supportlens}"
SUPPORTLENS_CACHE_DIR="${SUPPORTLENS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supportlens}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
[[ "$KAFKA_PORT" =~ ^[0-9]+$ ]] || die "KAFKA_PORT must be a number, got '$KAFKA_PORT'"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
# "user:password[,user:password…]": the client listener asks for SASL/PLAIN with these
# users (the first one is also the broker's own). For trying security settings locally;
# the passwords sit in server.properties (mode 600) under the state directory.
KAFKA_SASL_PLAIN_USERS="${KAFKA_SASL_PLAIN_USERS:-}"
for var in KAFKA_CONTROLLER_PORT KAFKA_START_TIMEOUT; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a number, got '${!var}'"
done

HOST=127.0.0.1
# Jars live outside the work tree: ~45 MB that must never be committed and
# should survive `git clean` and fresh clones.
DIST_DIR="$SUPPORTLENS_CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$DIST_DIR/libs"
MARKER="$DIST_DIR/.complete"

# Everything the broker writes sits under one directory so wiping it is a
# full reset.
KAFKA_HOME="$SUPPORTLENS_STATE_DIR/kafka"
DATA_DIR="$KAFKA_HOME/data"
LOG_DIR="$KAFKA_HOME/logs"
PID_FILE="$KAFKA_HOME/kafka.pid"
SERVER_PROPS="$KAFKA_HOME/server.properties"
SERVER_LOG="$LOG_DIR/server.log"
STDOUT_LOG="$LOG_DIR/stdout.log"

# Logged by KafkaRaftServer.startup() (KafkaBroker.STARTED_MESSAGE) once both
# the controller and the broker are serving; the port alone opens earlier.
STARTED_LINE="Kafka Server started"


usage() {
    cat >&2 <<EOF
usage: $(basename "$0") fetch|start|stop|status|bootstrap

  fetch      download Kafka $KAFKA_VERSION jars into $LIBS
  start      start a single-node broker on $HOST:$KAFKA_PORT (state in $KAFKA_HOME)
  stop       stop it
  status     print whether it is running (exit 1 if not)
  bootstrap  print the bootstrap address for clients

env: SUPPORTLENS_STATE_DIR SUPPORTLENS_CACHE_DIR KAFKA_PORT KAFKA_CONTROLLER_PORT
     KAFKA_HEAP_OPTS KAFKA_START_TIMEOUT KAFKA_SASL_PLAIN_USERS (user:password,…: SASL/PLAIN listener)
EOF
}

require_java() {
    command -v java >/dev/null 2>&1 ||
        die "java not found: install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)"
    local version major
    version="$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
    # Java 8 and older report "1.8.0_x"; 9+ report "17.0.x".
    major="${version%%.*}"
    [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$version")"
    [[ "$major" =~ ^[0-9]+$ ]] || die "cannot tell the Java version from 'java -version' (got '$version'); Kafka $KAFKA_VERSION needs Java 17+"
    ((major >= 17)) ||
        die "Kafka $KAFKA_VERSION needs Java 17+, but 'java' is $version: install openjdk-17-jre-headless (or newer) and put it first on PATH"
}

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

# The marker holds the pom's hash, so editing the pom (e.g. a log4j bump)
# refetches instead of silently running stale jars.
libs_ready() {
    [[ -f "$MARKER" && -d "$LIBS" ]] && [[ "$(cat "$MARKER")" == "$(pom_hash)" ]]
}

# Globals so the EXIT trap can still see them after cmd_fetch returns.
FETCH_TMP=""
MVN_PID=""

fetch_cleanup() {
    # Killing only this script would leave mvn running, and it would recreate
    # the temp dir we just removed.
    if [[ -n "$MVN_PID" ]]; then
        kill "$MVN_PID" 2>/dev/null || true
        wait "$MVN_PID" 2>/dev/null || true
    fi
    [[ -n "$FETCH_TMP" ]] && rm -rf "$FETCH_TMP"
    return 0
}

cmd_fetch() {
    require_java
    if libs_ready; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 ||
        die "mvn not found: install Maven to download the Kafka jars (Debian: apt-get install maven)"
    mkdir -p "$SUPPORTLENS_CACHE_DIR"
    # Leftovers of fetches that were killed with SIGKILL.
    find "$SUPPORTLENS_CACHE_DIR" -maxdepth 1 -name ".kafka-*.tmp.*" -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
    # Same filesystem as the final directory, so the closing mv is atomic and a
    # half-finished download never looks like a usable libs/.
    FETCH_TMP="$(mktemp -d "$SUPPORTLENS_CACHE_DIR/.kafka-$KAFKA_VERSION.tmp.XXXXXX")"
    trap fetch_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local mvn_out="$FETCH_TMP/mvn.log"
    # In the background so a signal reaches our trap while mvn is running.
    mvn -B -q -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$FETCH_TMP/libs" -DincludeScope=runtime >"$mvn_out" 2>&1 &
    MVN_PID=$!
    if ! wait "$MVN_PID"; then
        MVN_PID=""
        cat "$mvn_out" >&2
        die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"
    fi
    MVN_PID=""
    [[ -f "$FETCH_TMP/libs/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
        die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is missing from the copy"
    rm -f "$mvn_out"
    pom_hash >"$FETCH_TMP/.complete"
    # A stale or interrupted previous fetch (no/old marker) is replaced whole.
    rm -rf "$DIST_DIR"
    if mv -T "$FETCH_TMP" "$DIST_DIR" 2>/dev/null; then
        FETCH_TMP=""
    else
        # A concurrent fetch won the race; its copy is as good as ours.
        libs_ready || die "could not move the downloaded jars into $DIST_DIR"
    fi
    fetch_cleanup
    trap - EXIT INT TERM
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars"
}

port_open() {
    # bash's /dev/tcp avoids depending on nc/ss; timeout covers a filtered port.
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# Prints the pid when the pid file points at a live broker JVM. The command
# line check guards against the pid having been reused by something else
# after a reboot or crash.
broker_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    printf '%s\n' "$pid"
}

# The client port the running broker was started with, which may differ from
# this invocation's KAFKA_PORT.
running_port() {
    sed -n 's|^listeners=[A-Z_]*://[^:]*:\([0-9]*\).*|\1|p' "$SERVER_PROPS" 2>/dev/null
}

# With KAFKA_SASL_PLAIN_USERS: the SASL/PLAIN settings and JAAS users of the client listener.
sasl_properties() {
    [[ -z "$KAFKA_SASL_PLAIN_USERS" ]] && return 0
    local entry user password users="" first_user="" first_password=""
    local -a entries
    IFS=',' read -ra entries <<<"$KAFKA_SASL_PLAIN_USERS"
    for entry in "${entries[@]}"; do
        user="${entry%%:*}" password="${entry#*:}"
        [[ "$entry" == *:* && "$user" =~ ^[A-Za-z0-9_.-]+$ && -n "$password" && "$password" != *'"'* ]] ||
            die "KAFKA_SASL_PLAIN_USERS must be user:password[,user:password…] without quotes (entry of user '$user')"
        users+=" user_$user=\"$password\""
        if [[ -z "$first_user" ]]; then first_user="$user" first_password="$password"; fi
    done
    printf '%s\n' "sasl.enabled.mechanisms=PLAIN" "sasl.mechanism.inter.broker.protocol=PLAIN" \
        "listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"$first_user\" password=\"$first_password\"$users;"
}

write_server_properties() {
    local client=PLAINTEXT sasl
    [[ -n "$KAFKA_SASL_PLAIN_USERS" ]] && client=SASL_PLAINTEXT
    sasl="$(sasl_properties)"
    (umask 077 && cat >"$SERVER_PROPS" <<EOF
# Written by deploy/local/kafka.sh on every start; edits here are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=$client
listeners=$client://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=$client://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR
$sasl

# One broker: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# The default 50 partitions each for these add seconds and ~400 log lines to
# every start; one broker gains nothing from them.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1

# supportlens creates its topics itself (AdminClient), so a typo'd topic name
# should fail loudly instead of silently creating a new topic.
auto.create.topics.enable=false
num.partitions=1
# No point waiting for more consumers to join: tests start one at a time.
group.initial.rebalance.delay.ms=0
EOF
    )
}

format_storage_if_needed() {
    [[ -f "$DATA_DIR/meta.properties" ]] && return 0
    local uuid
    uuid="$(run_tool random-uuid)" || die "kafka.tools.StorageTool random-uuid failed"
    log "formatting $DATA_DIR (cluster id $uuid)"
    local out
    if ! out="$(run_tool format --standalone -t "$uuid" -c "$SERVER_PROPS" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "kafka.tools.StorageTool format failed"
    fi
}

run_tool() {
    # The tools log through log4j too; route that to server.log instead of
    # letting log4j complain about a missing config on the terminal.
    java -Xmx256m -Dkafka.logs.dir="$LOG_DIR" -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
        -cp "$LIBS/*" kafka.tools.StorageTool "$@"
}

show_logs() {
    local f
    for f in "$SERVER_LOG" "$STDOUT_LOG"; do
        [[ -s "$f" ]] || continue
        log "last 40 lines of $f:"
        tail -n 40 "$f" >&2
    done
}

# Waits for the broker to serve: the port accepting connections alone is not
# enough, because the socket server binds before the broker finishes
# recovering and registering with the controller.
wait_until_ready() {
    local pid="$1" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            show_logs
            die "broker process $pid exited during start-up"
        fi
        if grep -qF "$STARTED_LINE" "$SERVER_LOG" 2>/dev/null && port_open "$KAFKA_PORT"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            show_logs
            die "broker (pid $pid) not ready after ${KAFKA_START_TIMEOUT}s; still running, stop it with: $0 stop"
        fi
        sleep 0.5
    done
}

cmd_start() {
    local pid running
    if pid="$(broker_pid)"; then
        running="$(running_port)"
        if [[ -n "$running" && "$running" != "$KAFKA_PORT" ]]; then
            die "already running on $HOST:$running (pid $pid), not on KAFKA_PORT=$KAFKA_PORT; run '$0 stop' first to change ports"
        fi
        if port_open "$KAFKA_PORT"; then
            log "already running on $HOST:$KAFKA_PORT (pid $pid)"
            return 0
        fi
        # A previous start is still coming up; wait for it rather than start
        # a second JVM on the same data directory.
        log "broker pid $pid is up but $HOST:$KAFKA_PORT is not answering yet; waiting"
        wait_until_ready "$pid"
        log "running on $HOST:$KAFKA_PORT (pid $pid)"
        return 0
    fi
    rm -f "$PID_FILE"

    local port
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        if port_open "$port"; then
            die "port $HOST:$port is already in use by another process (not the broker in $KAFKA_HOME); stop it or pick other ports with KAFKA_PORT / KAFKA_CONTROLLER_PORT"
        fi
    done

    cmd_fetch
    mkdir -p "$DATA_DIR" "$LOG_DIR"
    write_server_properties
    format_storage_if_needed

    # Keep one previous run's logs; the ready check greps server.log, so it
    # must only contain this run's lines.
    local f
    for f in "$SERVER_LOG" "$STDOUT_LOG"; do
        [[ -f "$f" ]] && mv -f "$f" "$f.1"
    done

    log "starting Kafka $KAFKA_VERSION on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT, state in $KAFKA_HOME)"
    # Run from $KAFKA_HOME so nothing the JVM drops in its cwd (hs_err files)
    # lands in the caller's work tree. JVM flags follow kafka-run-class.sh.
    # shellcheck disable=SC2086  # KAFKA_HEAP_OPTS is a list of flags
    (
        cd "$KAFKA_HOME"
        exec nohup java $KAFKA_HEAP_OPTS \
            -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
            -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dkafka.logs.dir="$LOG_DIR" -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
            -cp "$LIBS/*" kafka.Kafka "$SERVER_PROPS" \
            >"$STDOUT_LOG" 2>&1 </dev/null
    ) &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"

    local t0=$SECONDS
    wait_until_ready "$pid"
    log "running on $HOST:$KAFKA_PORT (pid $pid, ready in $((SECONDS - t0))s)"
}

cmd_stop() {
    local pid
    if ! pid="$(broker_pid)"; then
        rm -f "$PID_FILE"
        log "not running"
        return 0
    fi
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid still alive after 30s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local pid port
    # Report the port the broker really listens on, not this shell's KAFKA_PORT.
    if pid="$(broker_pid)" && port="$(running_port)" && [[ -n "$port" ]] && port_open "$port"; then
        echo "running on $HOST:$port (pid $pid)"
        return 0
    fi
    echo "not running"
    return 1
}

case "${1:-}" in
fetch) cmd_fetch ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
bootstrap) echo "$HOST:$KAFKA_PORT" ;;
-h | --help | help) usage ;;
*)
    usage
    exit 2
    ;;
esac
