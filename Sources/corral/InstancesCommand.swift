import ArgumentParser
import Agent
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import PoolAPI
import Support

extension Corral {
    struct InstancesCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "instances",
            abstract: "Your instances, through the pool's user-facing API (/v1/server-instance).",
            discussion: """
                The pool is --pool, else CORRAL_POOL_URL, else http://127.0.0.1:8080. Your token (from \
                `corral pool user add`) is CORRAL_TOKEN, else the file --token-file or CORRAL_TOKEN_FILE names (mode 0600).
                """,
            subcommands: [
                List.self, Create.self, Show.self, Timeline.self, Console.self, SSH.self, Reboot.self, PowerOff.self, PowerOn.self, Delete.self, Users.self,
                ExtendLease.self, Launch.self, Flavors.self, Images.self,
            ])
    }
}

/// Where the pool is and who is asking.
struct UserAPIOptions: ParsableArguments {
    @Option(
        help: "The pool's URL; replicas of one pool as a comma-separated list, tried in turn (default: CORRAL_POOL_URL, else http://127.0.0.1:8080).")
    var pool: String?

    @Option(help: "A file holding your user token, mode 0600 (default: CORRAL_TOKEN_FILE; CORRAL_TOKEN wins over both).")
    var tokenFile: String?

    @Option(
        name: .customLong("pool-ca"),
        help: "With an https pool: a PEM file of the CA its certificate must chain to (default: CORRAL_POOL_CA, else the system's trust store).")
    var poolCA: String?

    @Flag(help: "Print the API's JSON instead of a table.")
    var json = false

    /// The pool's URLs: one, or several replicas of one pool.
    var poolURLs: [String] {
        let urls = pool ?? ProcessInfo.processInfo.environment["CORRAL_POOL_URL"] ?? "http://127.0.0.1:8080"
        return urls.split(separator: ",").map { url in
            let url = url.trimmingCharacters(in: .whitespaces)
            return url.hasSuffix("/") ? String(url.dropLast()) : url
        }
    }

    func token() -> String {
        let environment = ProcessInfo.processInfo.environment
        if let token = environment["CORRAL_TOKEN"], !token.isEmpty { return token }
        guard let path = tokenFile ?? environment["CORRAL_TOKEN_FILE"] else {
            fail("no user token: set CORRAL_TOKEN, or pass --token-file FILE (from `corral pool user add`)")
        }
        do {
            return try readTokenFile(path, field: "--token-file", holder: "user")
        } catch {
            fail("\(error)")
        }
    }

    /// The shared client, or one that trusts only --pool-ca's certificates,
    /// and with several replicas one that moves on from a refused
    /// connection at once (rather than retrying it until the deadline).
    private func httpClient() throws -> HTTPClient {
        let path = poolCA ?? ProcessInfo.processInfo.environment["CORRAL_POOL_CA"]
        guard path?.isEmpty == false || poolURLs.count > 1 else { return .shared }
        var configuration = HTTPClient.Configuration()
        if let path, !path.isEmpty {
            do {
                configuration.tlsConfiguration = try PoolClient.tlsConfiguration(trusting: path)
            } catch {
                fail("--pool-ca: \(error)")
            }
        }
        configuration.connectionPool.retryConnectionEstablishment = poolURLs.count == 1
        return HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
    }

    /// Sends a request and returns the `data` of the reply's envelope;
    /// a refusal prints its `msg` and exits 1.
    func call<T: Codable & Sendable>(
        _ method: HTTPMethod, _ path: String, body: (any Encodable)? = nil, as type: T.Type = [ServerInstance].self
    ) async throws -> T {
        var request = HTTPClientRequest(url: "")
        request.method = method
        request.headers.add(name: "X-Auth-Token", value: token())
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
        }
        let client = try httpClient()
        // Replicas in turn: the next when one cannot be reached (a refusal is an answer).
        var reply: Result<(Int, ByteBuffer), any Error> = .failure(ValidationError("--pool names no URL"))
        var tried: [String] = []
        for url in poolURLs {
            request.url = url + path
            do {
                let response = try await client.execute(request, timeout: .seconds(30))
                reply = .success((Int(response.status.code), try await response.body.collect(upTo: 16 << 20)))
                break
            } catch {
                reply = .failure(error)
                tried.append(url)
            }
        }
        if client !== HTTPClient.shared { try? await client.shutdown() }
        guard case .success(let (status, bytes)) = reply else {
            if case .failure(let error) = reply { fail("cannot reach the pool at \(tried.joined(separator: " or ")): \(error)") }
            fail("cannot reach the pool at \(tried.joined(separator: " or "))")
        }
        let data = Data(bytes.readableBytesView)
        if let envelope = try? JSONDecoder().decode(ServerEnvelope<T>.self, from: data) {
            guard envelope.success, let result = envelope.data else { fail("\(envelope.msg) (HTTP \(status))") }
            return result
        }
        // The token launch API answers in the appliance API's envelope.
        if let envelope = try? JSONDecoder().decode(Envelope<T>.self, from: data) {
            guard envelope.response == .success, let result = envelope.result else {
                fail("\(envelope.message ?? "refused") (HTTP \(status))")
            }
            return result
        }
        fail("the pool's reply (HTTP \(status)) is not the API's JSON: \(String(decoding: data.prefix(200), as: UTF8.self))")
    }

    /// Prints instances as a table, or as the API's JSON.
    func show(_ instances: [ServerInstance]) throws {
        if json { return try printJSON(instances) }
        var table = Table(header: ["ID", "HOSTNAME", "STATUS", "FLAVOR", "IMAGE", "CREATED", "IP", "USERS"])
        for instance in instances {
            table.rows.append([
                instance.id, instance.hostname ?? "-", instance.status, instance.serverFlavor, instance.serverImage,
                instance.creationDate, instance.publicIP ?? instance.privateIP ?? "-", "\(instance.users.count)",
            ])
        }
        print(table.render())
    }
}

/// A launch timeline as a table: each phase, when, seconds since the
/// request, and seconds since the phase before.
func printTimeline(_ entries: [ServerTimelineEntry]) {
    var table = Table(header: ["PHASE", "AT", "SINCE REQUEST", "STEP", "DETAIL"])
    var previous: Double?
    for entry in entries {
        table.rows.append([
            entry.phase, entry.at, String(format: "%.3f s", entry.seconds),
            previous.map { String(format: "+%.3f s", entry.seconds - $0) } ?? "-", entry.detail ?? "",
        ])
        previous = entry.seconds
    }
    print(table.render())
}

/// The text of a small file a user names, read no further than `maxBytes`
/// (a device or a huge file is refused, not read to the end); a problem
/// exits 1 naming the option.
func readTextFile(_ path: String, option: String, maxBytes: Int) -> String {
    guard let handle = FileHandle(forReadingAtPath: path) else { fail("\(option) \(path): cannot open it for reading") }
    defer { try? handle.close() }
    let data: Data
    do {
        data = try handle.read(upToCount: maxBytes + 1) ?? Data()
    } catch {
        fail("\(option) \(path): \(error.localizedDescription)")
    }
    guard data.count <= maxBytes else { fail("\(option) \(path): more than \(maxBytes) bytes") }
    return String(decoding: data, as: UTF8.self)
}

/// The path of one instance.
func instancePath(_ id: String) -> String {
    "/v1/server-instance/" + (id.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(["/"])) ?? id)
}

extension Corral.InstancesCommand {
    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the instances you see.")
        @OptionGroup var api: UserAPIOptions
        @Option(name: .customLong("cloudauth-id"), help: "Only those owned by this user id.") var cloudauthID: String?

        /// Instances asked for per page; the pool answers pages in id order.
        static let pageSize = 500

        func run() async throws {
            var query = "?limit=\(Self.pageSize)"
            if let cloudauthID {
                query += "&cloudauth-id=" + (cloudauthID.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? cloudauthID)
            }
            // Follow the pages to the end: a page shorter than asked for is the last.
            var all: [ServerInstance] = []
            var marker: String?
            while true {
                let page = try await api.call(.GET, "/v1/server-instance" + query + (marker.map { "&marker=\($0)" } ?? ""))
                all += page
                guard page.count == Self.pageSize, let last = page.last?.id else { break }
                marker = last
            }
            try api.show(all)
        }
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an instance of a flavor from an image, or from a template (warm when one is ready).")
        @OptionGroup var api: UserAPIOptions
        @Option(help: "The flavor (see `corral instances flavors`).") var flavor: String?
        @Option(help: "The image (see `corral instances images`).") var image: String?
        @Option(help: "Or: a template (its image and flavor); a warm instance of it is handed out when one is ready.")
        var template: String?
        @Option(name: .customLong("user"), help: "Also give this user (id or name) access (repeatable).") var users: [String] = []
        @Option(
            name: .customLong("ssh-key"),
            help: "One of your SSH keys (id or name, see `corral keys list`) to install (repeatable; default: all of them).")
        var sshKeys: [String] = []
        @Option(help: "A #cloud-config file or #! script (at most 64 KiB) to run once at first boot, after the wisp's.")
        var userData: String?
        @OptionGroup var waiting: WaitOptions

        func validate() throws {
            if template != nil {
                guard flavor == nil, image == nil else { throw ValidationError("--template names its own image and flavor; give it alone.") }
            } else if flavor == nil || image == nil {
                throw ValidationError("Give --flavor and --image, or --template.")
            }
        }

        func run() async throws {
            let body = ServerInstanceCreation(
                serverImage: image, serverFlavor: flavor, serverTemplate: template, users: users.isEmpty ? nil : users,
                sshKeys: sshKeys.isEmpty ? nil : sshKeys,
                userData: userData.map { readTextFile($0, option: "--user-data", maxBytes: 64 * 1024) })
            let created = try await api.call(.POST, "/v1/server-instance", body: body)
            guard waiting.wait, let instance = created.first else { return try api.show(created) }
            let name = instance.hostname ?? instance.id
            FileHandle.standardError.write(Data("waiting for \(name) (\(instance.id)) to boot, at most \(waiting.timeout) s:\n".utf8))
            let outcome = try await api.waitUntilUp(instance.id, timeout: waiting.timeout)
            try api.show([outcome.instance])
            if api.json { return }
            guard let ssh = outcome.ssh else {
                return print("\(name) is up; cloud-init finished, but its appliance cannot reach the guest's SSH server to check it.")
            }
            print("\(name) is up; its SSH server answers at \(ssh.detail). Log in with:")
            print("    corral instances ssh \(instance.id)\(outcome.instance.ssh?.user == nil ? " --user USER" : "")")
        }
    }

    struct Timeline: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show when an instance reached each phase of its launch, from the request to SSH.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String

        func run() async throws {
            let entries = try await api.call(.GET, instancePath(id) + "/timeline", as: [ServerTimelineEntry].self)
            if api.json { return try printJSON(entries) }
            printTimeline(entries)
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one instance.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String

        func run() async throws {
            let instances = try await api.call(.GET, instancePath(id))
            if api.json { return try printJSON(instances.first) }
            for instance in instances {
                let fields: [(String, String?)] = [
                    ("id", instance.id), ("hostname", instance.hostname), ("status", instance.status),
                    ("server-flavor", instance.serverFlavor), ("server-image", instance.serverImage),
                    ("creation-date", instance.creationDate), ("cloudauth-id", instance.cloudauthID),
                    ("users", instance.users.joined(separator: ", ")), ("public-ip", instance.publicIP),
                    ("private-ip", instance.privateIP), ("last-error", instance.lastError.map(neutralised)),
                ]
                for (name, value) in fields { print("\(name + ":")\(String(repeating: " ", count: 15 - name.count))\(value ?? "-")") }
            }
        }
    }

    /// Sends one of the power tasks.
    static func power(_ what: String, _ id: String, _ api: UserAPIOptions) async throws {
        let instances = try await api.call(.PUT, instancePath(id), body: ServerInstanceChange(.init(what: what)))
        if api.json { return try printJSON(instances.first) }
        print("\(what) sent to \(id); its status follows when its appliance reports (now \(instances.first?.status ?? "?"))")
    }

    struct Reboot: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Reboot an instance.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        func run() async throws { try await power("reboot", id, api) }
    }

    struct PowerOff: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "power-off", abstract: "Power an instance off.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        func run() async throws { try await power("power-off", id, api) }
    }

    struct PowerOn: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "power-on", abstract: "Power an instance on.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        func run() async throws { try await power("power-on", id, api) }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete an instance: its appliance destroys the VM and its disks.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        @OptionGroup var waiting: WaitOptions

        func run() async throws {
            let instances = try await api.call(.DELETE, instancePath(id))
            if waiting.wait {
                try await api.waitUntilDeleted(id, timeout: waiting.timeout)
                if api.json { return try printJSON(try await api.one(id)) }
                return print("deleted \(id): its appliance destroyed the VM and its disks")
            }
            if api.json { return try printJSON(instances.first) }
            print("deleting \(id); its status becomes DELETED when its appliance has destroyed it")
        }
    }

    struct Users: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change who has access to an instance (its owner always keeps it).")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        @Flag(help: "What to do with the users listed.") var how: How = .add
        @Argument(help: "User ids or names.") var users: [String] = []

        enum How: String, EnumerableFlag { case add, replace, delete }

        func run() async throws {
            let body = ServerInstanceChange(.init(what: "modify-users", how: how.rawValue, users: users))
            try api.show(try await api.call(.PUT, instancePath(id), body: body))
        }
    }

    struct ExtendLease: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "extend-lease", abstract: "Move an instance's lease end on (superusers only).")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        @Option(help: "How many seconds to add.") var seconds: Int

        func run() async throws {
            try api.show(try await api.call(.PUT, instancePath(id), body: ServerInstanceChange(.init(what: "extend-lease", seconds: seconds))))
        }
    }

    struct Launch: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Launch an instance from a template (a warm one when ready), through the token launch API.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The template's name.") var template: String
        @Option(help: "Only on appliances in this region.") var region: String?
        @Option(help: "A label kept with the instance.") var topic: String?
        @Flag(help: "Ask for a non-preemptible instance (superusers only).") var nonPreemptible = false

        func run() async throws {
            var query = ["preemptible=\(nonPreemptible ? 0 : 1)"]
            if let region { query.append("region=\(region.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? region)") }
            if let topic { query.append("topic=\(topic.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? topic)") }
            let path = "/api/stream/\(template.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? template)?"
            // The token goes in the X-Auth-Token header, not the query, so no log sees it.
            let instance = try await api.call(.POST, path + query.joined(separator: "&"), as: ServerInstance.self)
            try api.show([instance])
        }
    }

    struct Flavors: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the flavors you can create instances of.")
        @OptionGroup var api: UserAPIOptions

        func run() async throws {
            let flavors = try await api.call(.GET, "/v1/server-flavor", as: [ServerFlavor].self)
            if api.json { return try printJSON(flavors) }
            var table = Table(header: ["ID", "VCPUS", "MEMORY", "DISK", "DESCRIPTION"])
            for flavor in flavors {
                table.rows.append([flavor.id, "\(flavor.vcpus)", "\(flavor.memoryMiB) MiB", "\(flavor.diskGiB) GiB", flavor.description])
            }
            print(table.render())
        }
    }

    struct Images: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the images you can create instances from.")
        @OptionGroup var api: UserAPIOptions

        func run() async throws {
            let images = try await api.call(.GET, "/v1/server-image", as: [ServerImage].self)
            if api.json { return try printJSON(images) }
            var table = Table(header: ["ID", "FORMAT"])
            for image in images { table.rows.append([image.id, image.diskFormat]) }
            print(table.render())
        }
    }
}
