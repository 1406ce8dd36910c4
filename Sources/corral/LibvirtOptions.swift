import ArgumentParser
import Foundation
import Libvirt
import Logging

/// Options shared by every command that talks to libvirt.
struct LibvirtOptions: ParsableArguments {
    @Option(name: .long, help: "The libvirt URI to connect to.")
    var uri: String = ProcessInfo.processInfo.environment["CORRAL_LIBVIRT_URI"] ?? "qemu:///system"

    /// Opens the connection, runs `body`, and turns libvirt failures into
    /// one line on standard error and exit code 1.
    func withConnection(_ body: (Connection) async throws -> Void) async throws {
        let connection: Connection
        do {
            connection = try await Connection.open(uri, keepAlive: nil)
        } catch let error as LibvirtError {
            fail("cannot connect to libvirt at \(uri): \(error.message). Start libvirtd (scripts/setup does) or pass --uri.")
        }
        do {
            try await body(connection)
        } catch let error as LibvirtError where error.code == .noDomain {
            await connection.close()
            fail("\(error) at \(uri); `corral domains list --uri \(uri)` shows the domains there.")
        } catch let error as LibvirtError {
            await connection.close()
            fail("\(error) (libvirt at \(uri))")
        }
        await connection.close()
    }
}

/// `--log-level`, shared by the commands that run a server or daemon.
struct LogOptions: ParsableArguments {
    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(help: "text (one line per event) or json (one JSON object per line, with instance and action fields).")
    var logFormat: String = "text"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be trace, debug, info, notice, warning, error or critical (it was '\(logLevel)').")
        }
        guard ["text", "json"].contains(logFormat) else {
            throw ValidationError("--log-format must be text or json (it was '\(logFormat)').")
        }
    }

    /// A logger labelled `label` at the chosen level and format.
    func logger(_ label: String) -> Logger {
        var logger = logFormat == "json" ? Logger(label: label, factory: { JSONLogHandler(label: $0) }) : Logger(label: label)
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        return logger
    }
}

/// Prints `corral: message` on standard error and exits with status 1.
func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("corral: \(message)\n".utf8))
    exit(1)
}

/// Prints a value as pretty, key-sorted JSON.
func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    encoder.keyEncodingStrategy = .convertToSnakeCase
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}
