#!/bin/sh
# Make sure a nats-server binary exists (the clustered engine the tests start in
# tests/engines/): install it with apt-get when we are root, otherwise say what to run.
set -eu
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setpoint: installing nats-server with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends nats-server >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends nats-server >/dev/null; }
    # The package may start a system server on 4222; setpoint never uses it.
    exit 0
fi
echo "setpoint's engine tests need nats-server. Install it with:" >&2
echo "    sudo apt-get install -y nats-server" >&2
exit 1
