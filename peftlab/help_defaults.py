"""What `peftlab --help` and `peftlab train --help` show without importing torch (which the method classes
and the config need): the method names and each train flag"s default. tests/test_config_and_cli.py checks it
against the method classes and TrainConfig, so a change there that is not made here fails the suite."""

METHOD_NAMES = ("lora", "dora", "ia3", "ln_tuning", "bitfit", "houlsby", "qlora", "prompt_tuning", "said", "did",
                "full")

# config key -> default, for the keys the train flags set (None: no default shown)
TRAIN_DEFAULTS = {
    "model.name": "random:t5-tiny",
    "model.task": None,
    "data.train": None,
    "data.validation": None,
    "data.input_column": "text",
    "data.target_column": "label",
    "data.template": None,
    "data.pair_column": None,
    "data.max_source_length": 128,
    "data.max_target_length": 64,
    "method.name": "lora",
    "method.r": 8,
    "method.alpha": 8,
    "method.targets": None,
    "method.dropout": 0.0,
    "method.feedforward": None,
    "method.bottleneck": 64,
    "method.num_virtual_tokens": 20,
    "method.d": 1000,
    "run.batch_size": 8,
    "run.grad_accum": 1,
    "optim.lr": 0.0003,
    "optim.warmup_steps": 0,
    "run.max_steps": None,
    "run.epochs": 1,
    "run.logging_steps": 10,
    "run.eval_steps": None,
    "run.save_steps": None,
    "run.seed": 42,
    "run.device": "auto",
    "run.output": "runs/run",
    "run.resume": None,
    "run.distributed": "ddp",
    "run.report_to": None,
}
