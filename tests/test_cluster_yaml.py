"""cluster.yaml is a valid Ray cluster-launcher config with the shape this project relies on."""

import json
import os

import jsonschema
import ray
import yaml

from tests.conftest import ROOT


def load():
    with open(ROOT / "cluster.yaml") as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_validates_against_the_schema_inside_ray():
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as fh:
        schema = json.load(fh)
    jsonschema.validate(load(), schema)


def test_cluster_yaml_has_a_cpu_head_an_autoscaling_gpu_pool_and_shared_storage():
    cfg = load()
    assert cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ." in setup  # installs this project
    assert "VAE_STORAGE=s3://" in setup  # one shared results location for every node
    assert any(dst.endswith("vae-collapse") for dst in cfg["file_mounts"])


def test_cluster_yaml_keeps_the_dashboard_off_the_network():
    head = "\n".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head


def test_cluster_yaml_passes_rays_cross_field_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load())  # fills the provider's defaults, offline
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
