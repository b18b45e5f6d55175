# An image that holds one bundle and nothing else, for the Deployment's init container:
#   docker build -f deploy/k8s/bundle.Dockerfile -t karma-bundle:<model_version> artifacts/bundles/default
# (the build context is the bundle folder itself).
FROM busybox:1.36
COPY . /bundle
USER 10001
