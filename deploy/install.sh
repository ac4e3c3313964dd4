#!/bin/sh
# Install sigclassd as a systemd service. Safe to run again: it upgrades the package,
# refreshes the units and examples, and never overwrites an existing config.
set -eu

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [--root DIR] [--no-venv | --venv-only] [--python PYTHON] [--train] [--enable]

Installs sigclassd for systemd (run as root, from a checkout of the repository):
  /opt/sigclassd/venv              a virtualenv with sigclassd (pip install of this checkout;
                                   the base package, which serves without TensorFlow)
  /usr/local/bin/sigclassd         a link to the venv's sigclassd (for tap, simulate, forward)
  /etc/systemd/system/             sigclassd.service, sigclassd@.service, sigclassd-forwarder.service
  /etc/sigclassd/sigclassd.toml    the example config, only if there is no config yet
  /opt/sigclassd/examples/         every example config (sigclassd.toml, shard-a.toml, shard-b.toml)
then runs `systemctl daemon-reload`.

Options:
  --root DIR       install under DIR instead of / and skip systemctl (staging for a package;
                   a venv is not relocatable, so packagers add --no-venv)
  --no-venv        do not create or upgrade the venv (you provide /opt/sigclassd/venv)
  --venv-only      only create or upgrade the venv (e.g. built on a host, bound into a container)
  --python PYTHON  interpreter for the venv (default: /usr/bin/python3; needs Python >= 3.11).
                   It must not live under /home or /root: the units set ProtectHome=yes, which
                   hides those directories from the service, so a venv made from e.g. a pyenv
                   interpreter there cannot start. Install Debian's python3 and python3-venv.
  --train          also install the training package (the checkout's models/: sigclassd-train, with
                   TensorFlow), for `sigclassd train`/`eval`
                   (about 1.5 GB more; serving never uses it)
  --enable         also `systemctl enable --now sigclassd.service`
  -h, --help       show this help

Then: edit /etc/sigclassd/sigclassd.toml, `systemctl enable --now sigclassd`,
`journalctl -u sigclassd -f`. For shards see deploy/config/shard-a.toml.
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(dirname "$here")
root=""
train=""
venv=yes
units=yes
python=/usr/bin/python3
enable=no
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --no-venv) venv=no; shift ;;
        --venv-only) units=no; shift ;;
        --train) train="$source_dir/models"; shift ;;
        --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
        --enable) enable=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

prefix="$root/opt/sigclassd"
unit_dir="$root/etc/systemd/system"
config_dir="$root/etc/sigclassd"
bin_dir="$root/usr/local/bin"

if [ "$venv" = no ] && [ "$units" = no ]; then
    echo "install.sh: --no-venv and --venv-only leave nothing to do" >&2
    exit 2
fi
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or use --root DIR to stage an install)" >&2
    exit 1
fi
# The service runs as a dynamic user: everything it reads must be world-readable.
umask 022

if [ "$venv" = yes ]; then
    # The venv's python is a link to the interpreter it was made from: resolve it as the
    # service would see it.
    interpreter=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))') || {
        echo "install.sh: cannot run $python: install Debian's python3 and python3-venv, or pass --python" >&2
        exit 1
    }
    case "$interpreter" in
        /home/*|/root/*)
            echo "install.sh: $python is $interpreter, under /home or /root; the units' ProtectHome=yes" >&2
            echo "hides it from the service, which then cannot start. Use a system interpreter" >&2
            echo "(apt-get install python3 python3-venv; --python /usr/bin/python3)." >&2
            exit 1 ;;
    esac
    mkdir -p "$prefix"
    if [ ! -x "$prefix/venv/bin/python" ]; then
        echo "creating $prefix/venv with $interpreter"
        "$python" -m venv "$prefix/venv"
        "$prefix/venv/bin/pip" install --quiet --upgrade pip
    fi
    # One pip call, so that sigclassd-train's sigclassd comes from this checkout, not from an index.
    echo "installing sigclassd${train:+ and sigclassd-train} from $source_dir"
    "$prefix/venv/bin/pip" install --quiet --upgrade "$source_dir" ${train:+"$train"}
    if [ "$units" = no ]; then
        echo "done: $prefix/venv"
        exit 0
    fi
    mkdir -p "$bin_dir"
    ln -sfn /opt/sigclassd/venv/bin/sigclassd "$bin_dir/sigclassd"
fi

mkdir -p "$prefix/examples" "$unit_dir" "$config_dir"

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
