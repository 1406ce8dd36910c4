/// What went wrong in the pool, in words that name the field and the fix.
public enum PoolError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No such object (`what` is e.g. "user", `name` what was asked for).
    case notFound(what: String, name: String)
    /// The object exists already.
    case alreadyExists(what: String, name: String)
    /// A field's value is not acceptable.
    case invalid(field: String, reason: String)
    /// The caller may not touch the object.
    case forbidden(String)
    /// The request clashes with the object's current state (for example:
    /// an instance no longer on offer, a user at their limit).
    case conflict(String)
    /// The pool cannot serve this yet (for example: no wisp to boot from).
    case unavailable(String)
    /// A cap on how many of something one caller may hold is reached.
    case tooMany(String)
    /// The store could not be opened or used.
    case storage(String)

    public var description: String {
        switch self {
        case .notFound(let what, let name): "no \(what) named '\(name)'"
        case .alreadyExists(let what, let name): "a \(what) named '\(name)' exists already"
        case .invalid(let field, let reason): "\(field): \(reason)"
        case .forbidden(let message), .conflict(let message), .unavailable(let message), .tooMany(let message): message
        case .storage(let message): message
        }
    }
}
