"""The example runner (scripts/run_examples.py): output checks, broker URLs, the OTLP receiver.

The examples themselves run in `nox -s examples`; these tests only check the runner judges them
right, in well under a second.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_examples", ROOT / "scripts" / "run_examples.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def test_every_example_is_run_and_every_run_has_a_script() -> None:
    runs = runner.planned_runs()
    scripts = {run.script for run in runs}
    examples = {path.name for path in (ROOT / "examples").glob("*.py") if not path.name.startswith("_")}
    assert examples - scripts == set(), "examples the runner never runs"
    assert scripts - examples == set(), "runs of scripts that do not exist"
    assert all(run.expect for run in runs)
    assert len({run.name for run in runs}) == len(runs)


def test_every_broker_runs_the_swap_example() -> None:
    swaps = {run.needs for run in runner.planned_runs() if run.script == "swap_brokers.py"}
    assert swaps == {None, *runner.BROKERS.values()}


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "example.py"
    path.write_text(textwrap.dedent(body))
    return str(path)  # absolute: the runner joins it to examples/ and gets it back unchanged


def test_a_run_passes_only_with_exit_0_and_every_expected_line(tmp_path: Path) -> None:
    script = _script(tmp_path, 'print("billed order 1")\n')
    passed = runner.run_one(runner.Run("ok", script, (r"^billed order 1$",)), {}, False, None)
    assert passed.status == "passed"

    silent = runner.run_one(runner.Run("silent", script, (r"^billed order 1$", r"^dead letter")), {}, False, None)
    assert silent.status == "failed"
    assert "dead letter" in silent.note


def test_a_failing_or_hanging_example_fails(tmp_path: Path) -> None:
    crash = _script(tmp_path, 'print("billed order 1")\nraise SystemExit(3)\n')
    result = runner.run_one(runner.Run("crash", crash, (r"billed",)), {}, False, None)
    assert (result.status, result.note) == ("failed", "exit code 3")

    hang = _script(tmp_path, 'import time\nprint("started", flush=True)\ntime.sleep(30)\n')
    result = runner.run_one(runner.Run("hang", hang, (r"started",), timeout=1), {}, False, None)
    assert result.status == "failed"
    assert "timed out" in result.note
    assert "started" in result.output


def test_a_missing_broker_url_skips_or_fails_under_require(tmp_path: Path) -> None:
    script = _script(tmp_path, 'import os\nprint("url", os.environ["MSGKIT_URL"])\n')
    run = runner.Run("on sqs fifo", script, (r"^url sqs://h\?x=1&fifo=true$",)).on(
        "MSGKIT_SQS_URL", url_suffix="&fifo=true"
    )
    assert runner.run_one(run, {}, False, None).status == "skipped"
    assert runner.run_one(run, {"MSGKIT_SQS_URL": ""}, True, None).status == "failed"
    assert runner.run_one(run, {"MSGKIT_SQS_URL": "sqs://h?x=1"}, True, None).status == "passed"


def test_summary_line() -> None:
    run = runner.Run("r", "r.py", ("x",))
    results = [runner.Result(run, status, 0.0) for status in ("passed", "passed", "failed", "skipped")]
    assert runner.summary(results) == "examples: 2 passed, 1 failed, 1 skipped"


def test_the_receiver_decodes_what_the_otlp_exporter_sends() -> None:
    pytest.importorskip("opentelemetry.sdk")
    pytest.importorskip("opentelemetry.proto")
    http_exporter = pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with runner.OtlpReceiver() as receiver:
        provider = TracerProvider()
        exporter = http_exporter.OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("orders send", kind=trace.SpanKind.PRODUCER) as producer:
            pass
        with tracer.start_as_current_span("orders process", kind=trace.SpanKind.CONSUMER):
            pass  # a consumer span in a trace of its own: no producer parent
        ok, note = runner.check_trace(list(receiver.spans))
        assert not ok, note

        parent = trace.set_span_in_context(producer)
        with tracer.start_as_current_span("orders process", context=parent, kind=trace.SpanKind.CONSUMER):
            pass
        provider.shutdown()
        spans = list(receiver.spans)

    assert [(s.name, s.kind) for s in spans] == [
        ("orders send", "SPAN_KIND_PRODUCER"),
        ("orders process", "SPAN_KIND_CONSUMER"),
        ("orders process", "SPAN_KIND_CONSUMER"),
    ]
    assert spans[2].trace_id == spans[0].trace_id == f"{producer.get_span_context().trace_id:032x}"
    ok, note = runner.check_trace(spans)
    assert ok, note
