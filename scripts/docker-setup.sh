#!/usr/bin/env bash
# Prepare this machine for the Docker runtime's tests (agentfense-docker), as root. Idempotent:
#   1. install docker.io and debootstrap with apt-get when missing;
#   2. start dockerd in the background when no daemon answers (log: $DOCKERD_LOG), wait for it;
#   3. build the local base image $AGENTFENSE_DOCKER_IMAGE (default agentfense-test-base) with
#      `debootstrap --variant=minbase bookworm` + `docker import`, unless it already exists.
# No registry is reachable from our machines, hence the locally built image. Debian packages are
# fetched from the mirror apt is already configured with (override with DEBOOTSTRAP_MIRROR).
set -euo pipefail

IMAGE="${AGENTFENSE_DOCKER_IMAGE:-agentfense-test-base}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/agentfense-dockerd.log}"
# The first Debian archive URI of apt's own configuration (deb822 or one-line format).
apt_mirror() {
    # Missing files are normal (either format may be absent): never let grep's status stop us.
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources || true
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list || true
    } | awk '{print $2}' | { grep -v -- '-security' || true; } | { grep '/debian/\?$' || true; } | head -n 1
}
MIRROR="${DEBOOTSTRAP_MIRROR:-$(apt_mirror)}"
# python3 makes the image useful for SDK-style flows (~35 MB more; the full interpreter, since
# the conformance tests probe syscalls through ctypes); procps gives `ps`; git, make and gcc are
# the everyday tools the conformance suite checks under the seccomp allow-list.
INCLUDE="${DEBOOTSTRAP_INCLUDE:-python3,procps,git,make,gcc,libc6-dev}"

say() { printf '==> docker-setup: %s\n' "$*" >&2; }
die() { printf 'docker-setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
[ -n "$MIRROR" ] || die "no Debian mirror in apt's configuration; set DEBOOTSTRAP_MIRROR"

# 1. Packages.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v docker >/dev/null || die "no docker CLI after installing docker.io"

# 2. Daemon. The package does not start it here (no systemd as PID 1).
daemon_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! daemon_up; then
    say "starting dockerd (log: $DOCKERD_LOG)"
    # A stale pid file from a killed daemon makes dockerd refuse to start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 300); do
        daemon_up && break
        sleep 0.1
    done
    daemon_up || { tail -n 30 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 30 s"; }
fi
say "dockerd $(docker version --format '{{.Server.Version}}') is up"

# 3. Base image. Images this script builds carry a stamp; bump it when the image must change.
STAMP=3
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    have="$(docker image inspect --format '{{ index .Config.Labels "agentfense.setup" }}' "$IMAGE" 2>/dev/null || true)"
    if [ "$have" = "$STAMP" ]; then
        say "image $IMAGE already exists"
        exit 0
    fi
    # Only an image of ours is replaced: an older stamp, or the default name, which before
    # stamps only this script built. Anything else is the user's, used as it is.
    if [ -z "$have" ] && [ "$IMAGE" != "agentfense-test-base" ]; then
        say "image $IMAGE was not built by this script: using it as it is"
        exit 0
    fi
    say "image $IMAGE comes from an older version of this script: rebuilding"
    docker image rm -f "$IMAGE" >/dev/null
fi
rootfs="$(mktemp -d /var/tmp/agentfense-rootfs.XXXXXX)"
# --one-file-system: never descend into a /proc or /sys a failed debootstrap left mounted.
trap 'rm -rf --one-file-system "$rootfs"' EXIT
say "debootstrap bookworm (minbase, +$INCLUDE) into $rootfs"
debootstrap --variant=minbase --include="$INCLUDE" bookworm "$rootfs" "$MIRROR" >/dev/null
# The unprivileged sandbox user (uid/gid 1000, as in the bwrap runtime), so `id`/`whoami` resolve.
if ! grep -q "^sandbox:" "$rootfs/etc/passwd"; then
    echo "sandbox:x:1000:1000:AgentFense sandbox:/tmp/home:/bin/sh" >>"$rootfs/etc/passwd"
    echo "sandbox:x:1000:" >>"$rootfs/etc/group"
fi
# Trim what a sandbox never needs: apt lists, docs, man pages, locales.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
say "importing as $IMAGE"
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/sh"]' --change "LABEL agentfense.setup=$STAMP" - "$IMAGE" >/dev/null
say "image $IMAGE built ($(docker image inspect --format '{{.Size}}' "$IMAGE") bytes)"
