# Sourced by scripts/test and scripts/demo: what a fresh Debian machine lacks.
# Creates .venv (Python >= 3.11) if missing, `pip install -e '.[dev]'` when pyproject.toml
# changed since the last install, and makes sure a broker can be had (nothing to do when
# KPX_AMQP_URL is set or a Docker engine answers, else install rabbitmq-server: that logic
# lives in node/localbroker.py).
me=$(basename "$0")

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! python=$(find_python); then
        echo "$me: needs Python 3.11 or newer as python3.11 or python3" \
            "(Debian: apt-get install python3 python3-venv)" >&2
        exit 2
    fi
    echo "$me: creating .venv with $python" >&2
    if ! "$python" -m venv .venv; then
        echo "$me: '$python -m venv' failed; on Debian: apt-get install python3-venv" >&2
        rm -rf .venv
        exit 2
    fi
fi

# Reinstall only when pyproject.toml changed (the editable install picks up code changes).
stamp=.venv/.kpx-installed-pyproject
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "$me: installing kpx and its dev dependencies into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$wanted" >"$stamp"
fi

.venv/bin/python -m node.localbroker --ensure-installed

# tests/test_compose.py validates docker-compose.yml with `docker compose config`, or with
# Debian's docker-compose where the Compose plugin is missing (no Docker engine is needed).
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "$me: installing Debian's docker-compose (to validate docker-compose.yml)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            docker-compose; } >/dev/null ||
            echo "$me: could not install docker-compose; tests/test_compose.py will fail" >&2
    else
        echo "$me: neither 'docker compose' nor docker-compose found; as root:" \
            "apt-get install docker-compose" >&2
    fi
fi

# The console's browser test (tests/test_web_network.py) drives Debian's chromium; the
# demo does not need it. Only root on an apt-based system installs it; else the test says so.
if [ "$me" != demo ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] &&
    command -v apt-get >/dev/null 2>&1; then
    echo "$me: installing Debian's chromium for the console's browser test" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "$me: could not install chromium; the browser test will fail and say so" >&2
    fi
fi
