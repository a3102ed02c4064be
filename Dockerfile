# Device image of the edge agent: OIP v2 over HTTP on 8000, Prometheus /metrics on 9600.
# tests/test_image_recipe.py replays this recipe in a fresh virtual environment (no Docker
# engine in CI): it runs the builder's RUN lines, then the ENTRYPOINT + CMD and the HEALTHCHECK
# exactly as written here. Keep instructions in forms it understands (see that test).

# --- builder: compile nothing, just resolve wheels into a self-contained venv ---------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only the device packages: deployment/, simulator/ and bench/ are cloud or test code, and the
# wheel packages whatever of them is present (setuptools find with include patterns). README.md
# is the package's long description (pyproject `readme`); setuptools warns without it.
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY module ./module
# No extras: the default dependencies are the device's; the cloud and dev extras stay out.
RUN /opt/venv/bin/pip install .

# --- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
# Defaults for `python -m module` (EDGEML_* settings; the deployment's `env` overrides them):
# the model store in the volume, all interfaces (loopback inside the container's network
# namespace is unreachable from edgeHub and from published ports), JSON logs for the runtime.
# EDGEML_TRUSTED_KEYS comes from the deployment: the image trusts no publisher by itself.
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEML_STATE_DIR=/var/lib/edge-agent \
    EDGEML_HOST=0.0.0.0 \
    EDGEML_HTTP_PORT=8000 \
    EDGEML_METRICS_PORT=9600 \
    EDGEML_LOG_FORMAT=json
# A fixed numeric uid so that volume ownership and runAsNonRoot checks do not depend on names.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/edge-agent edge \
    && install -d -o edge -g edge -m 0750 /var/lib/edge-agent
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/edge-agent
# The model store: content-addressed artifacts and state.json must survive container restarts.
VOLUME ["/var/lib/edge-agent"]
EXPOSE 8000 9600
# urllib because slim has no curl; urlopen raises on a non-2xx answer, so the exit code is the
# verdict. The port is EDGEML_HTTP_PORT above: change both together.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2)"]
# The IoT Edge adapter: it connects through the workload API (IOTEDGE_* variables set by the
# runtime), or through EdgeHubConnectionString + EdgeModuleCACertificateFile for local debugging.
ENTRYPOINT ["python", "-m", "module"]
