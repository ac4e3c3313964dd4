#!/bin/sh
# Install sigclassd as a systemd service. Safe to run again: it upgrades the package,
# refreshes the units and examples, and never overwrites an existing config.
set -eu

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [--root DIR] [--no-venv] [--python PYTHON] [--enable]

Installs sigclassd for systemd (run as root, from a checkout of the repository):
  /opt/sigclassd/venv              a virtualenv with sigclassd (pip install of this checkout)
  /usr/local/bin/sigclassd         a link to the venv's sigclassd (for tap, simulate, forward)
  /etc/systemd/system/             sigclassd.service, sigclassd@.service, sigclassd-forwarder.service
  /etc/sigclassd/sigclassd.toml    the example config, only if there is no config yet
  /opt/sigclassd/examples/         every example config (sigclassd.toml, shard-a.toml, shard-b.toml)
then runs `systemctl daemon-reload`.

Options:
  --root DIR       install under DIR instead of / and skip systemctl (staging for a package;
                   a venv is not relocatable, so packagers add --no-venv)
  --no-venv        do not create or upgrade the venv (you provide /opt/sigclassd/venv)
  --python PYTHON  interpreter for the venv (default: python3; needs Python >= 3.11)
  --enable         also `systemctl enable --now sigclassd.service`
  -h, --help       show this help

Then: edit /etc/sigclassd/sigclassd.toml, `systemctl enable --now sigclassd`,
`journalctl -u sigclassd -f`. For shards see deploy/config/shard-a.toml.
EOF
}

root=""
venv=yes
python=python3
enable=no
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --no-venv) venv=no; shift ;;
        --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
        --enable) enable=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(dirname "$here")
prefix="$root/opt/sigclassd"
unit_dir="$root/etc/systemd/system"
config_dir="$root/etc/sigclassd"
bin_dir="$root/usr/local/bin"

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or use --root DIR to stage an install)" >&2
    exit 1
fi
# The service runs as a dynamic user: everything it reads must be world-readable.
umask 022

mkdir -p "$prefix/examples" "$unit_dir" "$config_dir" "$bin_dir"

if [ "$venv" = yes ]; then
    if [ ! -x "$prefix/venv/bin/python" ]; then
        echo "creating $prefix/venv"
        "$python" -m venv "$prefix/venv"
        "$prefix/venv/bin/pip" install --quiet --upgrade pip
    fi
    echo "installing sigclassd from $source_dir"
    "$prefix/venv/bin/pip" install --quiet --upgrade "$source_dir"
    ln -sfn /opt/sigclassd/venv/bin/sigclassd "$bin_dir/sigclassd"
fi

for unit in sigclassd.service sigclassd@.service sigclassd-forwarder.service; do
    install -m 0644 "$here/$unit" "$unit_dir/$unit"
done
for example in sigclassd.toml shard-a.toml shard-b.toml; do
    install -m 0644 "$here/config/$example" "$prefix/examples/$example"
done
if [ -e "$config_dir/sigclassd.toml" ]; then
    echo "keeping the existing $config_dir/sigclassd.toml"
else
    install -m 0644 "$here/config/sigclassd.toml" "$config_dir/sigclassd.toml"
    echo "installed the example config as $config_dir/sigclassd.toml"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$enable" = yes ]; then
        systemctl enable --now sigclassd.service
    fi
    echo "done: systemctl enable --now sigclassd; journalctl -u sigclassd -f"
else
    echo "done (systemd not running or --root given: no daemon-reload)"
fi
