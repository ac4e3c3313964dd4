#!/bin/sh
# Turns SIGCLASSD__SECTION__KEY=value environment variables into `--set section.key=value`
# options of `sigclassd run`, then execs the daemon so that it is PID 1 and receives
# SIGTERM from `podman stop` / `docker stop` itself.
set -eu
if [ "${1:-}" = run ]; then
    overrides=$(env | sed -n 's/^SIGCLASSD__\([A-Za-z0-9_]*\)__\([A-Za-z0-9_]*\)=.*/\1__\2/p')
    for name in $overrides; do
        key=$(printf '%s' "$name" | tr 'A-Z' 'a-z' | sed 's/__/./')
        value=$(printenv "SIGCLASSD__$name")
        set -- "$@" --set "$key=$value"
    done
fi
exec sigclassd "$@"
