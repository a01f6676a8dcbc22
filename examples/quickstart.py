"""The quickstart through the Python API: plan (dry run), train on a local Ray cluster with 2 CPU
workers, then load the adapter with PEFT.

    .venv/bin/python examples/quickstart.py
"""

from pathlib import Path

from rayquant import RayQuantTrainer

HERE = Path(__file__).parent


def main() -> None:
    trainer = RayQuantTrainer(
        model="rayquant/tiny-llama",  # built offline into ~/.cache/rayquant/models
        dataset=str(HERE / "data" / "tiny_alpaca.jsonl"),
        lora={"rank": 8, "alpha": 16},
        sft={"seq_len": 128, "global_batch_size": 8, "learning_rate": 3e-3, "max_steps": 30,
             "logging_steps": 2, "quantization": "nf4", "optimizer": "adamw_8bit"},
        scaling={"num_workers": 2},
        run={"name": "quickstart-py", "checkpoint_every_steps": 10, "max_failures": 1},
    )
    plan = trainer.plan()  # reads configs only
    print(f"{plan.num_workers} workers; per node type: "
          + ", ".join(f"{p.node_type} {p.quantization} micro {p.micro_batch_size} x accum "
                      f"{p.gradient_accumulation_steps}, {p.optimizer}" for p in plan.node_plans))
    result = trainer.fit()
    print("adapter:", result.adapter_dir)
    print("loss:", result.manifest["loss"]["first"], "->", result.manifest["loss"]["last"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayquant.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("rayquant/tiny-llama"))
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    print("loaded with PEFT:", type(model).__name__)


if __name__ == "__main__":
    main()
