# Device image of the edge agent: OIP v2 over HTTP on 8000, Prometheus /metrics on 9600.
# `make image` builds it (deployment/image/build.py); tests/container runs it in a real engine.

# --- builder: compile nothing, just resolve wheels into a self-contained venv ---------------
FROM python:3.11-slim AS builder
# Where pip finds packages, for builds behind a mirror or a TLS-inspecting proxy
# (deployment/image/build.py passes the host pip's settings). A build argument given no value is not
# set at all, so by default pip uses PyPI. They exist in this stage only, not in the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_DEFAULT_TIMEOUT
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the code or the README (the
# package's long description) then rebuilds in seconds instead of reinstalling them all.
# No extras: the default dependencies are the device's; the cloud and dev extras stay out.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --requirement /tmp/requirements.txt
# Only the device packages: deployment/, simulator/ and bench/ are cloud or test code, and the
# wheel packages whatever of them is present (setuptools find with include patterns).
COPY README.md ./
COPY wire ./wire
COPY agent ./agent
COPY module ./module
# What the runtime never runs goes (the README states the size budget): pip and setuptools
# (23 MB), the packages' own test suites (17 MB, numpy's mostly) and ONNX Runtime's offline
# tools for transformer optimisation, quantisation and model conversion (9 MB).
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3.*/site-packages/onnxruntime/transformers \
              /opt/venv/lib/python3.*/site-packages/onnxruntime/quantization \
              /opt/venv/lib/python3.*/site-packages/onnxruntime/tools

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
# verdict. Liveness, not readiness: a model that fails to load is reported through the twin,
# and restarting the container would not fix it. The port follows EDGEML_HTTP_PORT.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ['EDGEML_HTTP_PORT'], timeout=2)"]
# The IoT Edge adapter: it connects through the workload API (IOTEDGE_* variables set by the
# runtime), or through EdgeHubConnectionString + EdgeModuleCACertificateFile for local debugging.
ENTRYPOINT ["python", "-m", "module"]
