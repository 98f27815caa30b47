#!/bin/sh
# Make sure a mosquitto binary exists: install it with apt-get when we are root,
# otherwise say exactly what to run. Used by `make demo` and `make test`.
set -eu
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setpoint: installing mosquitto with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends mosquitto mosquitto-clients >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends mosquitto mosquitto-clients >/dev/null; }
    # The package starts a system broker on 1883; setpoint never uses it.
    exit 0
fi
echo "setpoint needs mosquitto. Install it with:" >&2
echo "    sudo apt-get install -y mosquitto mosquitto-clients" >&2
exit 1
