#!/usr/bin/env bash
# Installs the Prometheus and Alertmanager binaries supportlens runs locally
# (prometheus, promtool, prometheus-alertmanager) from Debian's packages, and
# Docker Compose (docker-compose, v1 from Debian), whose `config` validates
# deploy/compose.yaml without a Docker engine (tests/test_deploy.py), and headless
# Chromium, in which tests open the HTML reports and take a screenshot.
#
# supportlens starts these itself with its own config and data directories;
# the distro's daemons (system-wide config, port 9090/9093) must not be left
# running, or they would hold the ports and scrape/alert on nothing.
#
# Idempotent: when the commands exist it only prints their versions.
set -euo pipefail

PACKAGES=(prometheus prometheus-alertmanager docker-compose chromium fonts-wqy-microhei)
COMMANDS=(prometheus promtool prometheus-alertmanager docker-compose chromium)
# files of packages that bring no command: a CJK font, so a Chinese report's screenshot shows Chinese
FILES=(/usr/share/fonts/truetype/wqy/wqy-microhei.ttc)
POLICY_RC=/usr/sbin/policy-rc.d

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

missing_commands() {
    local c f
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || echo "$c"
    done
    for f in "${FILES[@]}"; do
        [[ -e "$f" ]] || echo "$f"
    done
}

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing: run as root to install ${PACKAGES[*]}"
    SUDO=(sudo)
fi

# pids of the distro daemons, to tell apart ones the install starts from any
# the user already runs.
daemon_pids() {
    pgrep -u prometheus -f '^/usr/bin/prometheus(-alertmanager)?( |$)' 2>/dev/null || true
}

POLICY_RC_OURS=""
restore_policy_rc() {
    [[ -n "$POLICY_RC_OURS" ]] && "${SUDO[@]}" rm -f "$POLICY_RC"
    return 0
}

apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

apt_lists_empty() {
    ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

install_packages() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install ${PACKAGES[*]} (prometheus, promtool, prometheus-alertmanager, docker-compose) with your package manager"
    log "installing ${PACKAGES[*]} (missing: $(missing_commands | paste -sd' '))"

    local before
    before="$(daemon_pids)"

    # The postinst scripts start the daemons through invoke-rc.d /
    # deb-systemd-invoke, which both obey policy-rc.d; exit 101 = "don't".
    # Docker images already ship one, so only add (and later remove) our own.
    if [[ ! -e "$POLICY_RC" ]]; then
        trap restore_policy_rc EXIT
        printf '#!/bin/sh\n# temporary, from supportlens deploy/local/services.sh\nexit 101\n' |
            "${SUDO[@]}" tee "$POLICY_RC" >/dev/null
        "${SUDO[@]}" chmod 755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi

    local out
    out="$(mktemp)"
    if apt_lists_empty || ! apt_install >"$out" 2>&1; then
        "${SUDO[@]}" apt-get update -q >"$out" 2>&1 || { cat "$out" >&2; rm -f "$out"; die "apt-get update failed"; }
        apt_install >"$out" 2>&1 || { cat "$out" >&2; rm -f "$out"; die "apt-get install ${PACKAGES[*]} failed"; }
    fi
    rm -f "$out"
    restore_policy_rc
    POLICY_RC_OURS=""
    trap - EXIT

    # Units are enabled by the postinst even when not started; on a systemd
    # host they would come up at the next boot and take ports 9090/9093.
    if [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl disable --now prometheus.service prometheus-alertmanager.service >/dev/null 2>&1 || true
    fi
    # Whatever init there is (or none), kill daemons that appeared during the
    # install and were not running before it.
    local pid
    for pid in $(daemon_pids); do
        grep -qx "$pid" <<<"$before" && continue
        log "stopping distro daemon pid $pid started by the package install"
        "${SUDO[@]}" kill "$pid" 2>/dev/null || true
    done
}

if [[ -n "$(missing_commands)" ]]; then
    install_packages
    [[ -z "$(missing_commands)" ]] || die "still missing after install: $(missing_commands | paste -sd' ')"
fi

# --version prints a multi-line banner (on stderr for some releases); keep
# line one. sed rather than head: head exiting early could SIGPIPE the tool
# and fail the pipeline under pipefail.
first_line() { "$@" 2>&1 | sed -n 1p; }
first_line prometheus --version
first_line promtool --version
first_line prometheus-alertmanager --version
first_line docker-compose version
chromium --version 2>/dev/null | sed -n 1p  # its wrapper script may warn on stderr first
