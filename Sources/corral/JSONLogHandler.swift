import Foundation
import Logging

/// `--log-format json`: one JSON object per line on standard error, for log
/// collectors. Fixed keys `time` (ISO 8601, UTC, milliseconds), `level`,
/// `label`, `message`; each metadata value under its own key (`instance`
/// and `action` on every line about an instance or an action), or under
/// `meta.KEY` when it would hide a fixed key.
struct JSONLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(label: String) { self.label = label }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    static let fixedKeys: Set<String> = ["time", "level", "label", "message"]

    func log(event: LogEvent) {
        FileHandle.standardError.write(Self.line(event: event, label: label, metadata: metadata.merging(metadataProvider?.get() ?? [:]) { $1 }))
    }

    /// The JSON line (ending in a newline) for one event.
    static func line(event: LogEvent, label: String, metadata: Logger.Metadata, at date: Date = Date()) -> Data {
        var object: [String: Any] = [
            "time": Date.ISO8601FormatStyle(includingFractionalSeconds: true).format(date),
            "level": event.level.rawValue, "label": label, "message": "\(event.message)",
        ]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) {
            object[fixedKeys.contains(key) ? "meta.\(key)" : key] = json(value)
        }
        // Every value is a string, a list or an object of them: serializable.
        var data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]))
            ?? Data(#"{"level":"error","message":"a log line could not be written as JSON"}"#.utf8)
        data.append(0x0A)
        return data
    }

    static func json(_ value: Logger.Metadata.Value) -> Any {
        switch value {
        case .string(let text): text
        case .stringConvertible(let convertible): convertible.description
        case .array(let values): values.map(json)
        case .dictionary(let values): values.mapValues(json)
        }
    }
}
