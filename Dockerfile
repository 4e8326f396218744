# The cluster's image: Ray with the project's pinned dependencies and pretrained backbone weights, installed once here
# instead of on every node at boot. The project's code is not in it: `ray job submit --working-dir .` ships it.
#   aws ecr create-repository --repository-name rayanom --region <REGION>
#   aws ecr get-login-password --region <REGION> |
#     docker login -u AWS --password-stdin <ACCOUNT>.dkr.ecr.<REGION>.amazonaws.com
#   docker build -t <ACCOUNT>.dkr.ecr.<REGION>.amazonaws.com/rayanom:0.1.0 . && docker push <that tag>
# The tag is the one cluster.yaml, cluster-gcp.yaml and k8s/rayjob.yaml name; a new build gets a new tag.
# FROM's Ray version and the pins below are constraints.txt's (tests/test_cluster.py checks them).
FROM rayproject/ray:2.60.0-py311-gpu

# timm backbones whose pretrained weights are baked in (the default resnet50, and resnet18): the driver and every
# actor load them from the image instead of downloading them; others land in the same cache on first use.
# --build-arg BACKBONES="..." bakes in others.
ARG BACKBONES="resnet50 resnet18"

ENV HF_HOME=/opt/hf-cache \
    TORCH_HOME=/opt/torch-cache

USER root
RUN mkdir -p "$HF_HOME" "$TORCH_HOME" && chown ray "$HF_HOME" "$TORCH_HOME"
USER ray

COPY constraints.txt /tmp/constraints.txt
# PyPI's Linux torch wheels are the CUDA builds (their CUDA libraries come with them; the host brings the driver).
RUN pip install --no-cache-dir -c /tmp/constraints.txt \
        "ray[data,default]==2.60.0" torch==2.14.1 torchvision==0.29.1 timm pyarrow numpy safetensors pillow \
        scikit-learn scipy matplotlib boto3 \
    && python -c "import ray, torch, torchvision, timm; assert ray.__version__ == '2.60.0', ray.__version__"

RUN python -c "import sys, timm; [timm.create_model(name, pretrained=True) for name in sys.argv[1:]]" $BACKBONES \
    && chmod -R a+rwX "$HF_HOME" "$TORCH_HOME"
