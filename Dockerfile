# geminikv: an etcd v3 server backed by PostgreSQL.
#   docker build -t geminikv .
#   docker run -p 2379:2379 -p 8080:8080 -v geminikv-data:/var/lib/geminikv geminikv
#   docker run -p 2379:2379 geminikv --endpoint postgres://user:pass@db:5432/kubernetes

FROM python:3.11-slim AS build
# Compilers for the Cython extensions; they stay in this stage. Unpinned on purpose: the
# base image's Debian release fixes their versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY proto ./proto
COPY geminikv ./geminikv
# The wheel carries the benchmark harness's code (as geminikv_bench, ~100 KB); its
# dependencies are the optional bench extra, which the image leaves out.
COPY benchmarks ./benchmarks
# The server and its runtime dependencies, at the versions CI tested (constraints.txt)
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 geminikv \
    && mkdir -p /var/lib/geminikv \
    && chown geminikv /var/lib/geminikv
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/geminikv
# The embedded PostgreSQL keeps its data here (unused with --endpoint).
VOLUME ["/var/lib/geminikv"]
ENV GEMINIKV_LISTEN_ADDRESS=0.0.0.0:2379 \
    GEMINIKV_DATA_DIR=/var/lib/geminikv \
    GEMINIKV_METRICS_BIND_ADDRESS=0.0.0.0:8080
EXPOSE 2379 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["geminikv"]
