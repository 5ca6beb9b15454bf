#!/bin/sh
# The container's entry point. `start` (the default) runs the daemon on /etc/ltu-daemon/config.toml when one is
# mounted, else the demo profile listening on all interfaces with a token kept in the data volume (a published
# port is reached from outside the container's loopback, which the daemon allows only with a token). Anything
# else is an ltu-daemon command: `check`, `schema`, `store export ...`.
set -eu
config=/etc/ltu-daemon/config.toml
if [ "${1:-start}" != start ]; then
    exec ltu-daemon "$@"
fi
[ $# -gt 0 ] && shift
if [ -f "$config" ]; then
    exec ltu-daemon start --config "$config" "$@"
fi
token=/var/lib/ltu-daemon/token
if [ ! -s "$token" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$token")
fi
echo "ltu-daemon: no $config mounted: running the demo profile on 0.0.0.0; clients send the token in $token" \
    "(the data volume): Authorization: Bearer <token>" >&2
exec ltu-daemon start --demo --set server.host=0.0.0.0 --set "server.token_file=$token" "$@"
