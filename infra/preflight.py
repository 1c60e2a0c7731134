#!/usr/bin/env python3
"""`make deploy`'s first step: refuses, with the numbers, reserved concurrency the account cannot give.

Lambda keeps 100 of an account's concurrency unreserved, and a reservation that would leave less
fails the deploy (CREATE_FAILED, after the long build). This reads the account's concurrency
(`aws lambda get-account-settings`), the reservations the chosen samconfig.toml environment
would deploy (its parameter_overrides, else the stack's current values on an update, else the
template's defaults), and what the stack's functions already hold, and says whether the
reservations fit.

    python3 infra/preflight.py --env prod              # asks AWS (boto3, the deploy venv's)
    aws lambda get-account-settings > account.json
    python3 infra/preflight.py --env prod --account-settings account.json   # a new stack, no AWS call

The checking itself (`check`) takes plain data, so tests feed it JSON without AWS.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The stack's functions and the parameters that set their reservations (0 - none).
RESERVATIONS = {
    "IngestFunction": "IngestReservedConcurrency",
    "GeneratorFunction": "GeneratorReservedConcurrency",
    "StreamFunction": "StreamReservedConcurrency",
    "SweeperFunction": "SweeperReservedConcurrency",
}

# Lambda refuses a reservation that would leave less than this unreserved.
UNRESERVED_MINIMUM = 100


@dataclass
class Environment:
    """What one samconfig.toml environment deploys."""

    name: str
    stack_name: str
    region: str | None
    profile: str | None
    overrides: dict[str, str]


def read_toml(text: str) -> dict:
    """TOML as plain data: the standard library's reader from Python 3.11, else the tomlkit
    that SAM CLI brings into the venvs."""
    try:
        import tomllib

        return tomllib.loads(text)
    except ModuleNotFoundError:
        import tomlkit

        return tomlkit.parse(text).unwrap()


def parse_overrides(value) -> dict[str, str]:
    """samconfig's parameter_overrides: `A=1 B="two words"`, or a list of `A=1` strings."""
    items = value if isinstance(value, list) else shlex.split(value or "")
    overrides = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"parameter_overrides: {item!r} is not Name=Value")
        overrides[key] = val
    return overrides


def environment(samconfig_text: str, name: str) -> Environment:
    """The deploy settings of environment `name` (global parameters, then deploy's)."""
    config = read_toml(samconfig_text)
    if name not in config:
        known = ", ".join(k for k, v in config.items() if isinstance(v, dict))
        raise ValueError(f"samconfig.toml has no environment {name!r} (it has: {known})")
    settings = {**config[name].get("global", {}).get("parameters", {})}
    settings.update(config[name].get("deploy", {}).get("parameters", {}))
    if not settings.get("stack_name"):
        raise ValueError(f"samconfig.toml: environment {name!r} names no stack_name")
    return Environment(
        name=name,
        stack_name=settings["stack_name"],
        region=settings.get("region"),
        profile=settings.get("profile"),
        overrides=parse_overrides(settings.get("parameter_overrides")),
    )


def template_parameters(template_text: str) -> dict[str, str | None]:
    """The template's parameters and their defaults (None: no default), read from its text.

    The Parameters section is plain `Name:` / `Default:` lines, so the standard library is
    enough (a YAML reader would also need the CloudFormation tags)."""
    section = re.search(r"^Parameters:\n(.*?)^\S", template_text, re.M | re.S)
    if not section:
        raise ValueError("template.yaml has no Parameters section")
    parameters: dict[str, str | None] = {}
    current = None
    for line in section.group(1).splitlines():
        if m := re.match(r"^  (\w+):\s*$", line):
            current = m.group(1)
            parameters[current] = None
        elif current and (m := re.match(r"^    Default:\s*(.*?)\s*$", line)):
            parameters[current] = m.group(1).strip("\"'")
    return parameters


def wanted_reservations(
    env: Environment, defaults: dict[str, str | None], current: dict[str, str] | None
) -> dict[str, int]:
    """Each function's reservation after the deploy: the override, else (updating) the stack's
    current value, which `sam deploy` keeps for a parameter it is not given, else the default."""
    wanted = {}
    for function, parameter in RESERVATIONS.items():
        if parameter in env.overrides:
            value = env.overrides[parameter]
        elif current is not None and parameter in current:
            value = current[parameter]
        else:
            value = defaults.get(parameter)
        try:
            wanted[function] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{parameter} is {value!r}: a whole number is needed") from None
    return wanted


def check(account: dict, wanted: dict[str, int], held: dict[str, int]) -> tuple[bool, list[str]]:
    """Whether `wanted` reservations can be deployed on an account whose settings are `account`
    (what `aws lambda get-account-settings` prints) while the stack's functions hold `held`.

    CloudFormation may raise one function's reservation before it lowers another's, so every
    increase must fit at once: unreserved - sum(increases) >= 100. Lowering always works."""
    limit = account["AccountLimit"]["ConcurrentExecutions"]
    unreserved = account["AccountLimit"]["UnreservedConcurrentExecutions"]
    problems = []
    for function, value in wanted.items():
        if value < 0:
            problems.append(f"{RESERVATIONS[function]} is {value}: 0 (none) or more")
    if wanted.get("GeneratorFunction") == 1:
        problems.append(
            "GeneratorReservedConcurrency is 1: 0 (none) or at least 2, the smallest maximum "
            "concurrency of an SQS event source"
        )
    increases = {f: w - held.get(f, 0) for f, w in wanted.items() if w > held.get(f, 0)}
    total_wanted = sum(wanted.values())
    total_held = sum(held.values())
    lines = [
        f"account concurrency {limit}, unreserved now {unreserved} "
        f"(Lambda keeps {UNRESERVED_MINIMUM} unreserved)",
        "reserved by this deploy: "
        + ", ".join(f"{RESERVATIONS[f]}={w}" for f, w in wanted.items())
        + f" (total {total_wanted}; the stack holds {total_held} now)",
    ]
    if increases:
        left = unreserved - sum(increases.values())
        lines.append(f"unreserved after the increases: {unreserved} - {sum(increases.values())} = {left}")
        if left < UNRESERVED_MINIMUM:
            problems.append(
                f"the reservations need {sum(increases.values())} more of the account's concurrency "
                f"but only {max(unreserved - UNRESERVED_MINIMUM, 0)} can be reserved "
                f"({unreserved} unreserved - {UNRESERVED_MINIMUM}); lower them (0 - none, as in "
                f"the default environment) or ask AWS for a higher concurrency quota "
                f"(Service Quotas: Lambda, Concurrent executions; at least "
                f"{limit + UNRESERVED_MINIMUM - left} here)"
            )
    return (not problems, lines + [f"refused: {p}" for p in problems])


def ask_aws(env: Environment):
    """What `read_account` reads, through boto3 with the environment's profile and region."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        sys.exit("preflight: boto3 is missing; run it with the deploy venv's python (make preflight)")
    try:
        session = boto3.Session(profile_name=env.profile, region_name=env.region)
        return read_account(env.stack_name, session.client("lambda"), session.client("cloudformation"))
    except (BotoCoreError, ClientError) as err:
        sys.exit(f"preflight: cannot read the account's concurrency or the stack: {err}")


def read_account(stack_name: str, lambda_client, cloudformation):
    """The account's settings, the stack's current parameter values (None: no stack yet) and
    the reservations its functions hold now."""
    from botocore.exceptions import ClientError

    account = lambda_client.get_account_settings()
    try:
        stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    except ClientError as err:
        if "does not exist" in str(err):
            return account, None, {}
        raise
    if stack["StackStatus"] == "REVIEW_IN_PROGRESS":
        return account, None, {}  # only a change set so far: sam deploy creates it
    current = {p["ParameterKey"]: p.get("ParameterValue") for p in stack.get("Parameters", [])}
    held = {}
    for function in RESERVATIONS:
        try:
            resource = cloudformation.describe_stack_resource(StackName=stack_name, LogicalResourceId=function)
            concurrency = lambda_client.get_function_concurrency(
                FunctionName=resource["StackResourceDetail"]["PhysicalResourceId"]
            )
        except ClientError:
            continue  # not created yet, or already gone
        held[function] = concurrency.get("ReservedConcurrentExecutions") or 0
    return account, current, held


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="default", help="the samconfig.toml environment (default)")
    parser.add_argument("--config", default=ROOT / "samconfig.toml", type=Path)
    parser.add_argument("--template", default=ROOT / "template.yaml", type=Path)
    parser.add_argument(
        "--account-settings",
        type=Path,
        help="JSON from `aws lambda get-account-settings` ('-' for stdin) instead of asking AWS; "
        "the stack is then taken to be new",
    )
    args = parser.parse_args(argv)
    try:
        env = environment(args.config.read_text(), args.env)
        defaults = template_parameters(args.template.read_text())
        unknown = sorted(set(env.overrides) - set(defaults))
        if unknown:
            raise ValueError(f"samconfig.toml [{env.name}] sets parameters the template lacks: {unknown}")
        if args.account_settings:
            text = sys.stdin.read() if str(args.account_settings) == "-" else args.account_settings.read_text()
            account, current, held = json.loads(text), None, {}
        else:
            account, current, held = ask_aws(env)
        wanted = wanted_reservations(env, defaults, current)
    except ValueError as err:
        print(f"preflight: {err}", file=sys.stderr)
        return 2
    ok, lines = check(account, wanted, held)
    action = "update" if current is not None else "create"
    print(f"preflight ({env.name}: {action} stack {env.stack_name})")
    for line in lines:
        print(f"  {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
