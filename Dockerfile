# syntax=docker/dockerfile:1
# Two stages: the wheel (Rust extension included) is built with maturin in the first; the runtime stage installs
# it into a slim Python image with no compiler. Base images are pinned by version.

FROM rust:1.88.0-slim-bookworm AS build
# Debian's python3 on bookworm is 3.11, like the runtime image, so the wheel matches it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv gcc make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/build.lock requirements/
RUN python3 -m venv /opt/maturin \
    && /opt/maturin/bin/pip install --no-cache-dir --require-hashes -r requirements/build.lock
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY python ./python
COPY packaging ./packaging
RUN /opt/maturin/bin/maturin build --release --locked --interpreter python3 --out /dist

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /dist /dist
COPY requirements/runtime.lock /tmp/runtime.lock
# Exactly the dependency versions CI tested (hash-checked), then the wheel without letting pip pick any others.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --require-hashes -r /tmp/runtime.lock \
    && pip install --no-cache-dir --no-deps /dist/*.whl \
    && rm -rf /dist /tmp/runtime.lock \
    && groupadd --gid 10001 tang \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tang
# Works with a read-only root file system: the server writes only its metrics files, under /tmp (an emptyDir
# in the chart), and the key directory is mounted read-only.
USER 10001:10001
EXPOSE 7500
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:7500/healthz', timeout=2).status != 200)"]
# `tangd` (the reference's command line) is installed too, for existing unit files and scripts.
ENTRYPOINT ["tang-server"]
CMD ["serve", "--fleet", "--keys-dir=/var/db/tang", "--host=0.0.0.0", "--port=7500", "--metrics-dir=/tmp/metrics"]
