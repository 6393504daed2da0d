# syntax=docker/dockerfile:1
# One image with the three commands: refresher, demo-worker and fakeidp.
#
#   docker build --build-arg VERSION="$(git describe --tags --always --dirty)" \
#                --build-arg REVISION="$(git rev-parse HEAD)" -t tokenmgr:dev .
#
# VERSION and REVISION are stamped into the binaries (internal/buildinfo:
# --version and the tokenmgr_build_info metric); .git is not copied in, so
# without them the version reads (devel) and the revision unknown.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=""
ARG REVISION=""
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags="-s -w -X github.com/tokenmgr/tokenmgr/internal/buildinfo.version=${VERSION} -X github.com/tokenmgr/tokenmgr/internal/buildinfo.revision=${REVISION}" \
      -o /out/ ./cmd/refresher ./cmd/demo-worker ./cmd/fakeidp

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=""
ARG REVISION=""
LABEL org.opencontainers.image.title="tokenmgr" \
      org.opencontainers.image.description="refresher, demo-worker and fakeidp: one OAuth 2.0 grant with rotating refresh tokens shared by a fleet through Redis" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/ /usr/local/bin/
# distroless's nonroot user, by number: Kubernetes can only check
# runAsNonRoot against a numeric user.
USER 65532:65532
ENTRYPOINT []
CMD ["refresher", "--help"]
