"""`coe deploy kuberay`: the pool as a KubeRay RayService, generated from experts.yaml."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from coe.cli.runtime import CliContext, pass_cli
from coe.cluster.kuberay import DEFAULT_CONFIG_PATH, DEFAULT_NAME, render_manifest, secret_name


@click.group()
def deploy() -> None:
    """Deployment manifests generated from experts.yaml."""


@deploy.command()
@click.option(
    "--image",
    envvar="COE_IMAGE",
    required=True,
    help="Container image of every Ray pod: coe with its gpu and ray extras (vLLM, "
    "ray[serve]) (env COE_IMAGE).",
)
@click.option(
    "--config-path",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="Where the pods find experts.yaml (mounted from the ConfigMap); paths in it relative "
    "to the file resolve next to it in the image.",
)
@click.option(
    "--name",
    default=DEFAULT_NAME,
    show_default=True,
    help="Name of the RayService; the ConfigMap is NAME-experts.",
)
@click.option(
    "--secret",
    help="Secret the pods take COE_REDIS_URL, COE_API_KEYS, HF_TOKEN and remote experts' "
    "keys from, each under its variable's name (default NAME-secrets).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the manifest to this file instead of stdout.",
)
@pass_cli
def kuberay(
    cli: CliContext,
    image: str,
    config_path: str,
    name: str,
    secret: str | None,
    out: Path | None,
) -> None:
    """Print a ConfigMap with experts.yaml and a RayService serving the pool on KubeRay.

    The RayService runs the gateway and each `cluster.deployments` entry as Ray Serve
    deployments, on a head pod (the gateway) and one worker group per replica shape (GPUs,
    CPUs, memory, custom resources). Apply it with `kubectl apply -f FILE`.
    """
    cfg = cli.config
    assert cfg.source is not None
    text = render_manifest(
        cfg,
        cfg.source.read_text(encoding="utf-8"),
        image=image,
        command=_command(cli, image, config_path, name, secret),
        config_path=config_path,
        name=name,
        secret=secret,
    )
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


def _command(cli: CliContext, image: str, config_path: str, name: str, secret: str | None) -> str:
    """The command line that regenerates the manifest, for its header: the config as given
    (a relative path stays relative), and only the options that differ from their defaults."""
    assert cli.config.source is not None
    source = cli.config_path or _relative(cli.config.source)
    args = ["coe", "--config", str(source), "deploy", "kuberay", "--image", image]
    if name != DEFAULT_NAME:
        args += ["--name", name]
    if config_path != DEFAULT_CONFIG_PATH:
        args += ["--config-path", config_path]
    if secret and secret != secret_name(name):
        args += ["--secret", secret]
    return shlex.join(args)


def _relative(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
