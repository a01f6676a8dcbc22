"""Hub models and datasets, with no network anywhere: a Hub cache laid out as huggingface_hub writes
it (conftest.write_hub_repo), datasets' own cache of a downloaded Hub dataset, and, for a gated and a
missing repo, a fake Hub endpoint on 127.0.0.1 that answers as the Hub does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_hub_repo
from rayquant.cli import main

REPO = "fake-org/tiny-llama"  # not in the catalog


@pytest.fixture
def hub_model(hub_cache, tiny_llama_dir):
    """REPO in the Hub cache (config, tokenizer, weights), and a repo with no weights cached."""
    files = {p.name: p for p in Path(tiny_llama_dir).iterdir() if p.is_file()}
    write_hub_repo(hub_cache, REPO, files)
    write_hub_repo(hub_cache, "fake-org/no-weights",
                   {n: p for n, p in files.items() if not n.endswith(".safetensors")})
    return hub_cache


def test_a_hub_model_not_in_the_catalog_is_planned_and_checked_from_the_cache(hub_model, tmp_path):
    from rayquant.models import ModelUnavailableError, check_model, config_path, is_catalog_id, resolve_model

    assert not is_catalog_id(REPO)
    assert config_path(REPO).endswith("config.json")  # only the config is read to plan
    out = CliRunner().invoke(main, ["plan", "-m", REPO, "--gpus", "1x1xA10G", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["model"] == REPO and plan["model_summary"]["name"] == REPO
    out = CliRunner().invoke(main, ["estimate", "-m", REPO, "--gpu", "A10G", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["model"] == REPO, out.output

    checked = check_model(REPO)
    assert checked.source == "hub" and checked.context_length == 512
    assert Path(checked.tokenizer_dir, "tokenizer.json").exists()
    assert "local Hub cache" in checked.weights and "HF_HUB_OFFLINE" in checked.weights
    assert Path(resolve_model(REPO), "model.safetensors").exists()  # what each worker loads

    with pytest.raises(ModelUnavailableError, match="has no weights in the local Hub cache .* HF_HUB_OFFLINE is set"):
        check_model("fake-org/no-weights")
    for command in (["plan", "-m", "fake-org/nowhere", "--gpus", "1x1xA10G"],
                    ["estimate", "-m", "fake-org/nowhere", "--gpu", "A10G"]):
        out = CliRunner().invoke(main, command)
        assert out.exit_code == 2 and "Traceback" not in out.output, out.output
        assert "fake-org/nowhere is not in the local Hub cache" in out.output
        assert "hf download fake-org/nowhere" in out.output and "HF_HUB_OFFLINE" in out.output


def test_train_dry_run_checks_the_hub_model_before_ray(hub_model, tmp_path):
    """A model that cannot be had fails the dry run (and fit(), before Ray starts) with one clear
    error, instead of ~200 lines of tracebacks from every worker."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"the cat {i}"}) + "\n" for i in range(16)))
    for model, code, needle in ((REPO, 0, f"Model {REPO}: weights read from the local Hub cache"),
                                ("fake-org/no-weights", 2, "has no weights in the local Hub cache"),
                                ("fake-org/nowhere", 2, "is not in the local Hub cache")):
        (tmp_path / "c.yaml").write_text(f"model: {model}\ndataset: d.jsonl\nsft: {{seq_len: 64}}\n"
                                         "scaling: {num_workers: 2}\n")
        out = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--dry-run"])
        assert out.exit_code == code and needle in out.output and "Traceback" not in out.output, out.output
    # sft.seq_len past the model's context: said, not silent (Unsloth extends it by RoPE scaling;
    # the hf backend is refused)
    for backend, code, needle in (("unsloth", 0, "Warning: sft.seq_len 1024 is beyond"),
                                  ("hf", 2, "sft.seq_len 1024 is beyond")):
        (tmp_path / "c.yaml").write_text(f"model: {REPO}\ndataset: d.jsonl\nsft: {{seq_len: 1024, "
                                         f"backend: {backend}, global_batch_size: 2}}\n"
                                         "scaling: {num_workers: 2}\n")
        out = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--dry-run"])
        assert out.exit_code == code and needle in out.output, out.output
        assert f"{REPO}'s context of 512 tokens" in out.output


FAKE_HUB = textwrap.dedent('''
    import json, os, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hub(BaseHTTPRequestHandler):
        """Answers as the Hub does: 403 GatedRepo, 404 RepoNotFound, else 401."""
        def answer(self):
            path = self.path.split("?")[0]
            if "gated-org/" in path:
                self.send_response(403); self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", "Access to this repo is restricted.")
            elif "missing-org/" in path:
                self.send_response(404); self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("X-Error-Message", "Repository not found")
            else:
                self.send_response(404)
            self.send_header("Content-Length", "0"); self.end_headers()
        do_GET = do_HEAD = answer
        def log_message(self, *args): pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"  # before huggingface_hub
    from rayquant.models import ModelUnavailableError, check_model, config_path
    from rayquant.data import DatasetError, load_rows
    said = {}
    for name, call in (("plan gated", lambda: config_path("gated-org/m")),
                       ("check gated", lambda: check_model("gated-org/m")),
                       ("plan missing", lambda: config_path("missing-org/m")),
                       ("dataset gated", lambda: load_rows("gated-org/d")),
                       ("dataset missing", lambda: load_rows("missing-org/d"))):
        try:
            call()
            said[name] = "no error"
        except (ModelUnavailableError, DatasetError) as e:
            said[name] = str(e)
    print(json.dumps(said))
''')


def test_gated_and_missing_repos_each_say_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", FAKE_HUB], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("plan gated", "check gated"):
        assert "the model gated-org/m is gated on the Hub (no HF_TOKEN is set)" in said[name], said
        assert "accept its terms at https://huggingface.co/gated-org/m" in said[name]
    assert "the model missing-org/m is not on the Hub, or is private" in said["plan missing"], said
    assert "the dataset gated-org/d is gated on the Hub" in said["dataset gated"], said
    assert "https://huggingface.co/datasets/gated-org/d" in said["dataset gated"]
    assert "the dataset missing-org/d is not on the Hub, or is private" in said["dataset missing"], said


# -- datasets: a local directory of data files, and a Hub dataset from datasets' cache ---------------

def _rows(n: int, word: str) -> str:
    return "".join(json.dumps({"instruction": f"which one is the {word}", "input": "cat dog",
                               "output": word}) + "\n" for _ in range(n))


def test_a_local_data_directory_gives_its_splits_and_subsets(tmp_path):
    from rayquant.data import DatasetError, load_rows, prepare

    d = tmp_path / "repo"
    for cfg, word in (("en", "cat"), ("fr", "dog")):
        (d / cfg).mkdir(parents=True)
        (d / cfg / "train.jsonl").write_text(_rows(6, word))
        (d / cfg / "test.jsonl").write_text(_rows(2, word))
    (d / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: en
          data_files:
          - {split: train, path: en/train.jsonl}
          - {split: test, path: en/test.jsonl}
        - config_name: fr
          data_files:
          - {split: train, path: fr/train.jsonl}
          - {split: test, path: fr/test.jsonl}
        ---
        """))
    assert len(load_rows(str(d), subset="en")) == 6  # the train split unless named
    assert len(load_rows(str(d), subset="fr", split="test")) == 2
    assert len(load_rows(str(d), subset="fr", role="eval")) == 2  # evaluation takes test (no validation)
    data = prepare(str(d), subset="fr", shuffle_seed=None)
    assert data.format == "alpaca" and data.dataset[0]["completion"] == "dog"
    with pytest.raises(DatasetError, match="has no split 'dev'; its splits are train, test"):
        load_rows(str(d), subset="en", split="dev")
    with pytest.raises(DatasetError, match="BuilderConfig 'de' not found") as e:
        load_rows(str(d), subset="de")
    assert "dataset_subset" in str(e.value)


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """fake-org/tiny-ds (configs en and fr, splits train and test) in datasets' own cache, as a
    download of it leaves it (datasets resolves a Hub id offline only from there)."""
    import shutil

    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text(_rows(20, "cat"))
    (src / "test.jsonl").write_text(_rows(4, "dog"))
    for cfg in ("en", "fr"):
        builder = Json(config_name=cfg, repo_id="fake-org/tiny-ds", dataset_name="tiny-ds",
                       cache_dir=str(tmp_path / "datasets"),
                       data_files=DataFilesDict.from_patterns({"train": [str(src / "train.jsonl")],
                                                               "test": [str(src / "test.jsonl")]}))
        builder.download_and_prepare()
        built = Path(builder.cache_dir)  # <org>___<name>/<cfg>-<hash>/0.0.0/ -> the Hub layout:
        dest = built.parent.parent / cfg / "0.0.0" / "fedcba9876543210fedcba9876543210fedcba98"
        dest.parent.mkdir(parents=True, exist_ok=True)
        built.rename(dest)
        shutil.rmtree(built.parent)
    return "fake-org/tiny-ds"


def test_a_hub_dataset_trains_and_evaluates_from_the_cache_offline(hub_dataset, tmp_path, monkeypatch):
    from rayquant.data import DatasetError, load_rows

    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    assert len(load_rows(hub_dataset, subset="en")) == 20
    assert len(load_rows(hub_dataset, subset="fr", role="eval")) == 4
    with pytest.raises(DatasetError, match="fake-org/nope is not in the local Hub cache .* HF_HUB_OFFLINE"):
        load_rows("fake-org/nope")
    (tmp_path / "c.yaml").write_text(f"model: rayquant/tiny-llama\ndataset: {hub_dataset}\ndataset_subset: en\n"
                                     f"eval_dataset: {hub_dataset}\neval_dataset_split: test\n"
                                     "sft: {seq_len: 128, global_batch_size: 4}\nscaling: {num_workers: 2}\n")
    out = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert got["dataset"]["path"] == hub_dataset and got["dataset"]["rows"] == 20
    assert got["dataset"]["eval"]["rows"] == 4 and "subset en, split test" in got["dataset"]["eval"]["source"]


def test_hub_datasets_and_the_new_keys_survive_k8s_rendering(tmp_path):
    """The pods run `rayquant train` on the mounted config: a Hub dataset id travels as it is (the
    pods load it; it is not embedded like a local file), a small local eval file travels in the
    ConfigMap, and the evaluation, packing and tracking keys reach the pods unchanged."""
    import yaml

    from rayquant.config import parse_train_config

    (tmp_path / "eval.jsonl").write_text(_rows(4, "cat"))
    config = {"model": "meta-llama/Llama-3.1-8B", "dataset": "fake-org/tiny-ds", "dataset_subset": "en",
              "dataset_split": "train", "eval_dataset": "eval.jsonl",
              "sft": {"seq_len": 512, "global_batch_size": 8, "learning_rate": "2e-4", "packing": True,
                      "eval_steps": 10, "keep_best": True},
              "run": {"report_to": ["tensorboard", "mlflow"]}}
    text = yaml.safe_dump(config).replace("'2e-4'", "2e-4")  # written as a user writes it
    (tmp_path / "job.yaml").write_text(text)
    out = CliRunner().invoke(main, ["k8s", "--config", str(tmp_path / "job.yaml"), "--gpus", "1x1xA10G",
                                    "--image", "img:1", "--storage", "pvc", "--hf-token-secret", "hf-token"])
    assert out.exit_code == 0, out.output
    configmap = next(yaml.safe_load_all(out.output))
    mounted = yaml.safe_load(configmap["data"]["train.yaml"])
    assert mounted["dataset"] == "fake-org/tiny-ds" and mounted["dataset_subset"] == "en"
    assert mounted["eval_dataset"] == "/etc/rayquant/eval_dataset.jsonl"
    assert configmap["data"]["eval_dataset.jsonl"] == _rows(4, "cat")
    assert mounted["sft"]["packing"] is True and mounted["sft"]["learning_rate"] == 2e-4
    assert mounted["run"]["report_to"] == ["tensorboard", "mlflow"] and mounted["sft"]["keep_best"] is True
    # the pods read it as a valid config (their eval file is the ConfigMap's)
    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "eval_dataset.jsonl").write_text(configmap["data"]["eval_dataset.jsonl"])
    mounted.update(eval_dataset=str(pod / "eval_dataset.jsonl"), plan="auto")
    parsed = parse_train_config(mounted, base_dir=str(pod))
    assert parsed.dataset == "fake-org/tiny-ds" and parsed.sft.eval_steps == 10
    # a local directory cannot travel in a ConfigMap: said with a fix
    (tmp_path / "dir").mkdir()
    (tmp_path / "job.yaml").write_text(text.replace("fake-org/tiny-ds", "dir"))
    out = CliRunner().invoke(main, ["k8s", "--config", str(tmp_path / "job.yaml"), "--gpus", "1x1xA10G",
                                    "--image", "img:1", "--storage", "pvc", "--hf-token-secret", "hf-token"])
    assert out.exit_code == 2 and "is a directory, which cannot travel in a ConfigMap" in out.output, out.output
