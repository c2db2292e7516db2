# One image for every Python service of the stack (topics, migrate, projector, api, simulator):
# docker-compose.yml picks the console script per service with `command:`.
#
#   docker build -t ws-connection-tracker:local .
#   docker run --rm ws-connection-tracker:local conntrack-api --help

# --- build stage: install the distribution (runtime dependencies only, no [dev] extras) into a
# virtualenv. A separate stage keeps the source tree, pip's build artefacts and any build tools
# out of the final image; only the finished virtualenv is copied over.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
WORKDIR /src
# The whole (filtered, see .dockerignore) context: setuptools needs pyproject.toml, the README it
# names, and the packages. There is no lock file to install dependencies from first, so there is
# no cheaper layer to split off.
COPY . .
# pip byte-compiles while installing; that matters because the runtime user cannot write
# __pycache__ into the root-owned virtualenv.
RUN /opt/venv/bin/pip install .

# --- runtime stage.
# Same base image as the build stage, so the virtualenv's interpreter symlinks stay valid.
FROM python:3.11-slim

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed, non-root UID: nothing in the container needs root, and a fixed number makes volume
# permissions predictable if someone mounts one.
RUN groupadd --system --gid 10001 conntrack \
    && useradd --system --uid 10001 --gid conntrack --create-home --home-dir /home/conntrack \
       --shell /usr/sbin/nologin conntrack

COPY --from=build /opt/venv /opt/venv

USER conntrack
WORKDIR /home/conntrack

# gRPC API, projector metrics, API metrics (the ports docker-compose.yml configures).
EXPOSE 50051 9464 9465

# Default command: the gRPC API. Every service in docker-compose.yml sets its own command.
CMD ["conntrack-api", "serve"]
