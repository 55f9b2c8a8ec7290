#!/usr/bin/env bash
# Install edgepaged as a systemd service on this box (run as root from a checkout):
#
#   sudo deploy/install.sh --profile jetson-orin-nano-8gb [--model /var/lib/edgepaged/models/M]
#                          [--system-site-packages] [--extras serve,gpu]
#
# Creates the `edgepaged` system user, a virtualenv in /opt/edgepaged/venv with this checkout
# installed, /etc/edgepaged/edgepaged.env (kept if it exists), the unit and a drop-in with the
# profile's memory limit, then enables the unit. It does not start it:
#   sudo systemctl start edgepaged && journalctl -u edgepaged -f
# Re-running it upgrades the package and the unit and keeps the settings.
set -euo pipefail

PREFIX=/opt/edgepaged
CONF_DIR=/etc/edgepaged
UNIT_DIR=/etc/systemd/system
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

profile=""
model=""
venv_args=()
extras=""

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        # JetPack ships its own CUDA build of torch system-wide; let the venv see it.
        --system-site-packages) venv_args+=(--system-site-packages); shift ;;
        --extras) extras="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

[[ $EUID -eq 0 ]] || { echo "run as root (sudo $0 ...)" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is required" >&2; exit 1; }

if [[ -z "$extras" ]]; then
    extras=serve
    # A CUDA box (discrete card or Jetson) gets the Triton kernels too.
    if [[ -e /dev/nvidia0 || -e /etc/nv_tegra_release ]]; then extras=serve,gpu; fi
fi

if [[ "$model" == /home/* ]]; then
    echo "the service cannot read /home (ProtectHome=yes); put the model under /var/lib/edgepaged/models" >&2
    exit 1
fi

echo "== user"
if ! id edgepaged >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/edgepaged --no-create-home --shell /usr/sbin/nologin edgepaged
fi
for group in video render; do  # GPU device nodes belong to these groups where they exist
    if getent group "$group" >/dev/null; then usermod -aG "$group" edgepaged; fi
done

echo "== package (${SRC}[${extras}]) into $PREFIX/venv"
install -d -m 0755 "$PREFIX"
python3 -m venv "${venv_args[@]}" "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet "${SRC}[${extras}]"
install -m 0644 "$SRC/docs/serving.md" "$PREFIX/serving.md"

echo "== settings in $CONF_DIR/edgepaged.env"
install -d -m 0750 -g edgepaged "$CONF_DIR"
if [[ ! -e "$CONF_DIR/edgepaged.env" ]]; then
    install -m 0640 -g edgepaged "$SRC/deploy/edgepaged.env.example" "$CONF_DIR/edgepaged.env"
fi
if [[ -n "$profile" ]]; then sed -i "s|^EDGEPAGED_PROFILE=.*|EDGEPAGED_PROFILE=$profile|" "$CONF_DIR/edgepaged.env"; fi
if [[ -n "$model" ]]; then sed -i "s|^EDGEPAGED_MODEL=.*|EDGEPAGED_MODEL=$model|" "$CONF_DIR/edgepaged.env"; fi
profile="$(sed -n 's/^EDGEPAGED_PROFILE=//p' "$CONF_DIR/edgepaged.env")"

echo "== unit (profile ${profile:-cpu})"
install -m 0644 "$SRC/deploy/edgepaged.service" "$UNIT_DIR/edgepaged.service"
memory_max="$("$PREFIX/venv/bin/python" -c \
    'import sys; from edgepaged.profiles import load_profile; from edgepaged.server.systemd import memory_max; print(memory_max(load_profile(sys.argv[1])))' \
    "${profile:-cpu}")"
install -d -m 0755 "$UNIT_DIR/edgepaged.service.d"
printf '# Written by deploy/install.sh from profile %s.\n[Service]\nMemoryMax=%s\n' "${profile:-cpu}" "$memory_max" \
    > "$UNIT_DIR/edgepaged.service.d/memory.conf"
systemctl daemon-reload
systemctl enable edgepaged.service
echo "installed: MemoryMax=$memory_max; start with: sudo systemctl start edgepaged"
