"""Tests of infra/preflight.py without AWS: account settings as `aws lambda get-account-settings`
prints them, the project's own samconfig.toml and template.yaml. `make test-infra` runs them."""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

import preflight

try:
    import boto3
    from botocore.stub import Stubber
except ImportError:  # make test-infra runs these with the tools venv, which has boto3
    boto3 = None

ROOT = Path(__file__).resolve().parent.parent
PROD = {"IngestFunction": 50, "GeneratorFunction": 50, "StreamFunction": 200, "SweeperFunction": 0}
NONE = {function: 0 for function in preflight.RESERVATIONS}


def account(limit: int, unreserved: int | None = None) -> dict:
    """What get-account-settings prints for an account with this quota and unreserved share."""
    return {
        "AccountLimit": {
            "TotalCodeSize": 80530636800,
            "CodeSizeUnzipped": 262144000,
            "CodeSizeZipped": 52428800,
            "ConcurrentExecutions": limit,
            "UnreservedConcurrentExecutions": limit if unreserved is None else unreserved,
        },
        "AccountUsage": {"TotalCodeSize": 0, "FunctionCount": 0},
    }


class Check(unittest.TestCase):
    def test_no_reservations_deploy_on_a_new_account_of_ten(self):
        ok, lines = preflight.check(account(10), NONE, held={})
        self.assertTrue(ok, lines)

    def test_production_reservations_are_refused_on_a_new_account_with_the_numbers(self):
        ok, lines = preflight.check(account(50), PROD, held={})
        self.assertFalse(ok)
        text = "\n".join(lines)
        self.assertIn("account concurrency 50, unreserved now 50", text)
        self.assertIn("total 300", text)
        self.assertIn("need 300 more", text)
        self.assertIn("only 0 can be reserved", text)
        self.assertIn("at least 400", text)

    def test_production_reservations_fit_a_quota_of_400_exactly(self):
        self.assertTrue(preflight.check(account(400), PROD, held={})[0])
        self.assertFalse(preflight.check(account(399), PROD, held={})[0])

    def test_another_stacks_reservations_count_against_a_new_one(self):
        # A second production stack in an account of 1,000 whose first one holds 300.
        self.assertTrue(preflight.check(account(1000, 700), PROD, held={})[0])
        ok, lines = preflight.check(account(1000, 350), PROD, held={})
        self.assertFalse(ok)
        self.assertIn("only 250 can be reserved", "\n".join(lines))

    def test_an_update_counts_what_the_stack_already_holds(self):
        # The stack holds its 300 and exactly 100 are left: redeploying the same values fits,
        # though 300 more would not.
        ok, lines = preflight.check(account(400, 100), PROD, held=PROD)
        self.assertTrue(ok, lines)
        self.assertIn("the stack holds 300 now", "\n".join(lines))
        self.assertFalse(preflight.check(account(400, 100), PROD, held={})[0])

    def test_an_update_that_lowers_reservations_always_fits(self):
        ok, lines = preflight.check(account(400, 100), NONE, held=PROD)
        self.assertTrue(ok, lines)

    def test_every_increase_must_fit_before_any_decrease_is_counted(self):
        # Streams +100 and ingest -50: CloudFormation may raise one before lowering the other.
        wanted = {**PROD, "StreamFunction": 300, "IngestFunction": 0}
        ok, lines = preflight.check(account(1000, 150), wanted, held=PROD)
        self.assertFalse(ok)
        self.assertIn("unreserved after the increases: 150 - 100 = 50", "\n".join(lines))
        self.assertTrue(preflight.check(account(1000, 200), wanted, held=PROD)[0])

    def test_a_generator_reservation_of_one_is_refused(self):
        ok, lines = preflight.check(account(1000), {**NONE, "GeneratorFunction": 1}, held={})
        self.assertFalse(ok)
        self.assertIn("GeneratorReservedConcurrency is 1", "\n".join(lines))


class Configuration(unittest.TestCase):
    def setUp(self):
        self.samconfig = (ROOT / "samconfig.toml").read_text()
        self.parameters = preflight.template_parameters((ROOT / "template.yaml").read_text())

    def test_the_template_reserves_nothing_by_default(self):
        for parameter in preflight.RESERVATIONS.values():
            self.assertEqual(self.parameters[parameter], "0", parameter)
        self.assertEqual(self.parameters["LogRetentionDays"], "30")
        self.assertEqual(self.parameters["Tracing"], "PassThrough")

    def test_default_reserves_nothing_and_prod_reserves_300(self):
        default = preflight.environment(self.samconfig, "default")
        prod = preflight.environment(self.samconfig, "prod")
        self.assertNotEqual(default.stack_name, prod.stack_name, "each environment is its own stack")
        self.assertEqual(preflight.wanted_reservations(default, self.parameters, None), NONE)
        self.assertEqual(preflight.wanted_reservations(prod, self.parameters, None), PROD)

    def test_environments_set_only_parameters_the_template_has(self):
        for name in ["default", "prod"]:
            env = preflight.environment(self.samconfig, name)
            self.assertLessEqual(set(env.overrides), set(self.parameters), name)

    def test_an_update_keeps_the_stacks_value_of_a_parameter_left_out(self):
        env = preflight.Environment("x", "stack", None, None, {"IngestReservedConcurrency": "5"})
        current = {"StreamReservedConcurrency": "200"}
        wanted = preflight.wanted_reservations(env, self.parameters, current)
        self.assertEqual(wanted, {**NONE, "IngestFunction": 5, "StreamFunction": 200})

    def test_overrides_are_read_as_sam_reads_them(self):
        self.assertEqual(
            preflight.parse_overrides('A=1 B="two words" C='), {"A": "1", "B": "two words", "C": ""}
        )
        self.assertEqual(preflight.parse_overrides(["A=1", "B=x=y"]), {"A": "1", "B": "x=y"})
        with self.assertRaises(ValueError):
            preflight.parse_overrides("A")

    def test_an_unknown_environment_names_the_known_ones(self):
        with self.assertRaisesRegex(ValueError, "has no environment 'staging'.*default, prod"):
            preflight.environment(self.samconfig, "staging")


@unittest.skipUnless(boto3, "boto3 is not installed")
class ReadAccount(unittest.TestCase):
    """`read_account` against boto3 clients whose answers are stubbed: botocore checks every
    request and answer against the services' own models, so the calls are the real ones."""

    def setUp(self):
        def client(service):
            return boto3.client(
                service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
            )

        self.lambda_client, self.cloudformation = client("lambda"), client("cloudformation")
        self.lambdas, self.stacks = Stubber(self.lambda_client), Stubber(self.cloudformation)
        self.lambdas.add_response("get_account_settings", account(1000, 700))

    def read(self):
        with self.lambdas, self.stacks:
            result = preflight.read_account("chat-fsm-prod", self.lambda_client, self.cloudformation)
        self.lambdas.assert_no_pending_responses()
        self.stacks.assert_no_pending_responses()
        return result

    def test_a_new_stack_holds_nothing(self):
        self.stacks.add_client_error(
            "describe_stacks",
            service_error_code="ValidationError",
            service_message="Stack with id chat-fsm-prod does not exist",
            expected_params={"StackName": "chat-fsm-prod"},
        )
        self.assertEqual(self.read(), (account(1000, 700), None, {}))

    def test_an_existing_stack_tells_its_parameters_and_what_its_functions_hold(self):
        self.stacks.add_response(
            "describe_stacks",
            {
                "Stacks": [
                    {
                        "StackName": "chat-fsm-prod",
                        "CreationTime": "2026-12-01T00:00:00Z",
                        "StackStatus": "UPDATE_COMPLETE",
                        "Parameters": [
                            {"ParameterKey": "StreamReservedConcurrency", "ParameterValue": "200"},
                            {"ParameterKey": "Tracing", "ParameterValue": "Active"},
                        ],
                    }
                ]
            },
            {"StackName": "chat-fsm-prod"},
        )
        for function, reserved in [("IngestFunction", None), ("GeneratorFunction", 50)]:
            physical = f"chat-fsm-prod-{function}-X"
            self.stacks.add_response(
                "describe_stack_resource",
                {
                    "StackResourceDetail": {
                        "LogicalResourceId": function,
                        "PhysicalResourceId": physical,
                        "ResourceType": "AWS::Lambda::Function",
                        "LastUpdatedTimestamp": "2026-12-01T00:00:00Z",
                        "ResourceStatus": "UPDATE_COMPLETE",
                    }
                },
                {"StackName": "chat-fsm-prod", "LogicalResourceId": function},
            )
            answer = {} if reserved is None else {"ReservedConcurrentExecutions": reserved}
            self.lambdas.add_response("get_function_concurrency", answer, {"FunctionName": physical})
        # The stream and sweeper functions were never created (a failed first deploy).
        for function in ["StreamFunction", "SweeperFunction"]:
            self.stacks.add_client_error(
                "describe_stack_resource",
                service_error_code="ValidationError",
                service_message=f"Resource {function} does not exist for stack chat-fsm-prod",
            )
        _, current, held = self.read()
        self.assertEqual(current, {"StreamReservedConcurrency": "200", "Tracing": "Active"})
        self.assertEqual(held, {"IngestFunction": 0, "GeneratorFunction": 50})


class Pins(unittest.TestCase):
    def test_make_validate_lints_with_the_sam_cli_that_deploys(self):
        def pin(name):
            lines = (ROOT / "infra" / name).read_text().splitlines()
            return [line for line in lines if line.startswith("aws-sam-cli==")]

        self.assertEqual(pin("requirements.txt"), pin("requirements-deploy.txt"))
        self.assertEqual(len(pin("requirements.txt")), 1)


class CommandLine(unittest.TestCase):
    def run_main(self, *args, settings: dict):
        with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
            json.dump(settings, file)
            file.flush()
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = preflight.main([*args, "--account-settings", file.name])
            return code, out.getvalue() + err.getvalue()

    def test_prod_on_a_small_account_exits_1_with_the_numbers(self):
        code, output = self.run_main("--env", "prod", settings=account(50))
        self.assertEqual(code, 1, output)
        self.assertIn("preflight (prod: create stack chat-fsm-prod)", output)
        self.assertIn("refused: the reservations need 300 more", output)

    def test_default_on_a_small_account_passes(self):
        code, output = self.run_main(settings=account(10))
        self.assertEqual(code, 0, output)
        self.assertIn("preflight (default: create stack chat-fsm)", output)


if __name__ == "__main__":
    unittest.main()
