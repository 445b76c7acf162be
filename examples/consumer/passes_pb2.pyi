from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Pass(_message.Message):
    __slots__ = ("id", "title", "org_id", "created_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    org_id: str
    created_by: str
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., org_id: _Optional[str] = ..., created_by: _Optional[str] = ...) -> None: ...

class GetPassRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CreatePassRequest(_message.Message):
    __slots__ = ("title",)
    TITLE_FIELD_NUMBER: _ClassVar[int]
    title: str
    def __init__(self, title: _Optional[str] = ...) -> None: ...

class ListPassesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("email", "org_id", "scopes", "token_id")
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    email: str
    org_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    token_id: str
    def __init__(self, email: _Optional[str] = ..., org_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., token_id: _Optional[str] = ...) -> None: ...
