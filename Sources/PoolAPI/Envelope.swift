/// Every pool reply to an appliance:
/// `{"response": "success"|"fail"|"error", "result": ..., "message": "..."}`.
public struct Envelope<Result: Codable & Sendable>: Codable, Sendable {
    /// Whether the request worked (`success`), was refused (`fail`), or
    /// broke on the pool's side (`error`).
    public enum Response: String, Codable, Sendable {
        case success, fail, error
    }

    public var response: Response
    public var result: Result?
    /// What went wrong, naming the field and the fix; nil on success.
    public var message: String?

    public init(response: Response, result: Result? = nil, message: String? = nil) {
        self.response = response
        self.result = result
        self.message = message
    }

    /// A successful reply carrying `result`.
    public static func success(_ result: Result) -> Envelope { Envelope(response: .success, result: result) }
}

/// A result with nothing in it, for replies that only say yes or no.
public struct NoResult: Codable, Sendable, Equatable {
    public init() {}
}

extension Envelope where Result == NoResult {
    /// A refusal (`fail`) with a message.
    public static func fail(_ message: String) -> Envelope { Envelope(response: .fail, message: message) }
    /// A failure on the pool's side (`error`) with a message.
    public static func error(_ message: String) -> Envelope { Envelope(response: .error, message: message) }
}
