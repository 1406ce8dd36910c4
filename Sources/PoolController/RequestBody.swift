import Foundation
import Hummingbird

/// Why a request body could not be read, naming the field at fault.
struct RequestBodyError: Error, CustomStringConvertible {
    var description: String
}

/// The most a request body may hold: an appliance's report, with up to
/// 1000 console lines of at most 1 KiB.
let maximumRequestBody = 1 << 20

/// The most the bodies read before their sender is known may hold: an
/// appliance's authorization, whose token is inside the body.
let maximumAuthorizationBody = 16 << 10

/// The most a check-in may hold: 1000 instances and their acknowledged actions.
let maximumCheckInBody = 256 << 10

/// The most a user's request body may hold.
let maximumUserBody = 128 << 10

/// The whole request body, up to `limit` bytes; a larger one is a 413.
func collectBody(_ request: Request, upTo limit: Int = maximumRequestBody) async throws -> ByteBuffer {
    var request = request
    do {
        return try await request.collectBody(upTo: limit)
    } catch {
        throw Refusal(.contentTooLarge, "the body is larger than \(limit) bytes")
    }
}

/// Decodes a JSON body, turning decoding failures into messages that name
/// the field and what it should be.
func decodeJSON<T: Decodable>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
    do {
        return try JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView))
    } catch let error as DecodingError {
        throw RequestBodyError(description: describe(error))
    }
}

func describe(_ error: DecodingError) -> String {
    func path(_ codingPath: [any CodingKey], _ last: (any CodingKey)? = nil) -> String {
        let keys = (codingPath + (last.map { [$0] } ?? [])).map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
        return keys.joined(separator: ".").replacingOccurrences(of: ".[", with: "[")
    }
    switch error {
    case .keyNotFound(let key, let context):
        return "missing field '\(path(context.codingPath, key))'"
    case .typeMismatch(let type, let context):
        return "field '\(path(context.codingPath))' must be \(typeName(type))"
    case .valueNotFound(let type, let context):
        return "field '\(path(context.codingPath))' must be \(typeName(type)), not null"
    case .dataCorrupted(let context):
        return context.codingPath.isEmpty
            ? "the body is not valid JSON" : "field '\(path(context.codingPath))' is invalid: \(context.debugDescription)"
    @unknown default:
        return "the body could not be read"
    }
}

private func typeName(_ type: Any.Type) -> String {
    switch type {
    case is String.Type: "a string"
    case is Bool.Type: "true or false"
    case is Int.Type, is Int64.Type: "an integer"
    case is Double.Type: "a number"
    default: "\(type)".hasPrefix("Array") ? "an array" : "an object"
    }
}
