FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TUNEHOUSE_DATA_DIR=/data
WORKDIR /app

# CPU build of the pinned torch first, so nothing else pulls a CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e .

RUN useradd --create-home tunehouse && mkdir -p /data && chown tunehouse /data
USER tunehouse
VOLUME /data
EXPOSE 8000
CMD ["tunehouse", "run", "--host", "0.0.0.0", "--port", "8000"]
