"""Thin boto3 wrapper: the one place that sends requests, so --dry-run, error messages and credential
redaction are handled once for every command.

Calls that only read always run (a dry run still needs to look); calls that change something go through
:meth:`Aws.change`, which under --dry-run prints the exact request as JSON instead of sending it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import boto3
import botocore.config
import botocore.exceptions

from fruitpipe.errors import FruitpipeError


class AwsError(FruitpipeError):
    """AWS refused a request; ``code`` is AWS's error code (e.g. NoSuchBucket) for callers that expect some."""

    def __init__(self, service: str, operation: str, code: str, message: str) -> None:
        super().__init__(f"AWS {service} {operation} failed: {code}: {message}")
        self.code = code


def new_session(region: str) -> boto3.session.Session:
    """A boto3 session using the standard credential chain (env, profile, SSO, instance role) and endpoint."""
    return boto3.session.Session(region_name=region)


class Aws:
    """Clients for one region, with dry-run and one-line errors."""

    def __init__(self, region: str, *, dry_run: bool = False, out: TextIO | None = None,
                 session: boto3.session.Session | None = None) -> None:
        self.region = region
        self.dry_run = dry_run
        self._out = out
        self._session = session or new_session(region)
        self._clients: dict[str, Any] = {}

    def in_region(self, region: str) -> Aws:
        """The same credentials in another region; sharing the session keeps each new client cheap."""
        if region == self.region:
            return self
        return Aws(region, dry_run=self.dry_run, out=self._out, session=self._session)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5},
                                            user_agent_appid="fruitpipe")
            self._clients[service] = self._session.client(service, region_name=self.region, config=config)
        return self._clients[service]

    def read(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """Sends a request that changes nothing, dry run or not."""
        return self._send(service, operation, params)

    def change(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """Sends a request that changes something; under --dry-run prints it and returns an empty response."""
        if self.dry_run:
            request = {"dry_run": True, "service": service, "operation": self._api_name(service, operation),
                       "region": self.region, "parameters": params}
            print(json.dumps(request, indent=2, default=_placeholder), file=self._out or sys.stdout)
            return {}
        return self._send(service, operation, params)

    def pages(self, service: str, operation: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every page of a paginated read."""
        paginator = self.client(service).get_paginator(operation)
        try:
            yield from paginator.paginate(**params)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(service, operation, exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._botocore_error(service, operation, exc) from None

    def credential_source(self) -> str | None:
        """How the credentials were found (env, shared-credentials-file, sso, iam-role, ...), never their value."""
        credentials = self._session.get_credentials()
        return credentials.method if credentials else None

    def _send(self, service: str, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return getattr(self.client(service), operation)(**params)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(service, operation, exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._botocore_error(service, operation, exc) from None

    def _api_name(self, service: str, operation: str) -> str:
        return self.client(service).meta.method_to_api_mapping[operation]

    def _client_error(self, service: str, operation: str, exc: botocore.exceptions.ClientError) -> AwsError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "Error"))
        message = error.get("Message") or "no message"
        return AwsError(service, self._api_name(service, operation), code, self.redact(message))

    def _botocore_error(self, service: str, operation: str, exc: botocore.exceptions.BotoCoreError) -> FruitpipeError:
        if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
            return FruitpipeError("no usable AWS credentials: set AWS_PROFILE, run `aws configure` or "
                                  "`aws sso login`, then try again")
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return FruitpipeError(f"cannot reach AWS {service} in {self.region}: check the network and the region")
        return FruitpipeError(f"AWS {service} {self._api_name(service, operation)} failed: {self.redact(str(exc))}")

    def redact(self, text: str) -> str:
        """``text`` with the current access key, secret key and session token replaced by ****."""
        credentials = self._session.get_credentials()
        if credentials is None:
            return text
        frozen = credentials.get_frozen_credentials()
        for secret in (frozen.access_key, frozen.secret_key, frozen.token):
            if secret:
                text = text.replace(secret, "****")
        return text


def _placeholder(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)
