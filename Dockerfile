# streamsink production image: `streamsink run` reading one DynamoDB stream.
#
#   docker build -t streamsink .
#   docker run --rm \
#     -v "$PWD/config/audit-archive.toml:/etc/streamsink/config.toml:ro" \
#     -v streamsink-data:/var/lib/streamsink \
#     -e AWS_REGION=us-east-1 \
#     streamsink
#
# Config: mount a TOML file read-only at /etc/streamsink/config.toml (examples in config/); any key can be
# overridden with STREAMSINK_<SECTION>__<KEY> environment variables. Validate it with
#   docker run --rm -v ...:/etc/streamsink/config.toml:ro streamsink validate --config /etc/streamsink/config.toml
#
# Credentials are never baked in: boto3's default chain finds them at run time (ECS task role, EKS IRSA or pod
# identity, EC2 instance profile, or AWS_* variables passed with -e). The permissions they need are in
# config/iam-policy.json.
#
# Stopping: SIGTERM makes the pipeline drain (deliver, flush, checkpoint) for up to
# runtime.shutdown_timeout_seconds (30 s by default), longer than Docker's 10 s default grace period, so stop
# with `docker stop -t 40` or set terminationGracePeriodSeconds / stopTimeout accordingly.
#
# Health: with [metrics] port = 9108, point a liveness or readiness probe at http://<pod>:9108/healthz (503 with
# the reasons when a shard is stuck behind or the pipeline stopped on an error).

FROM python:3.11-slim

LABEL org.opencontainers.image.title="streamsink" \
      org.opencontainers.image.description="DynamoDB Streams replication pipeline: S3 Parquet archive, replica table, SQS, SNS" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.streamsink.config-path="/etc/streamsink/config.toml" \
      io.streamsink.data-path="/var/lib/streamsink"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and mounted volumes can be chowned to it.
RUN groupadd --system --gid 10001 streamsink \
 && useradd --system --uid 10001 --gid streamsink --home-dir /var/lib/streamsink --create-home \
      --shell /usr/sbin/nologin streamsink \
 && mkdir -p /etc/streamsink

# Only the runtime dependencies: moto (the `demo` extra) is for `streamsink demo` and the tests, not production.
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir .

# The working directory is where relative paths resolve, such as dead_letter.path (streamsink-dead-letters.jsonl
# by default): mount a persistent volume here so dead letters survive a restart.
WORKDIR /var/lib/streamsink
USER 10001:10001

# Prometheus metrics and /healthz, when the config sets [metrics] port = 9108. Logs are JSON lines on stderr.
EXPOSE 9108

ENTRYPOINT ["streamsink"]
CMD ["run", "--config", "/etc/streamsink/config.toml"]
