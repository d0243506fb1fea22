# gpuml on a CUDA 13 machine: `docker build -t gpuml .` then
#   docker run --gpus all -v $PWD/runs:/work/runs -v ~/.cache/gpuml:/root/.cache/gpuml gpuml train /opt/gpuml/configs/mlp.yaml
# The runtime image carries NVRTC, which CuPy uses to compile kernels/*.cu on first use.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*

COPY . /opt/gpuml
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "/opt/gpuml[cuda13]"
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /work
ENTRYPOINT ["gpuml"]
CMD ["info"]
